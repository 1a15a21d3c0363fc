//! The search list a Kubernetes pod's resolver walks, read backwards: which base names and
//! search suffixes a queried name can be made of.

/// Which search suffix a candidate carries, in the order a pod's resolv.conf lists them
/// (`<ns>.svc.<cluster domain>`, `svc.<cluster domain>`, `<cluster domain>`, then the node's
/// domains), or `Bare`: the name as asked, with no suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Suffix {
    Namespace,
    Svc,
    Cluster,
    /// One of the extra suffixes (`--search-suffix` or learned), by index.
    Extra(u8),
    Bare,
}

/// The most extra suffixes known at once (given and learned): a bound on what traffic can add.
pub const MAX_EXTRA_SUFFIXES: usize = 16;

/// One reading of a queried name: `base` + `suffix` (and, for `Namespace`, the namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading<'a> {
    pub base: &'a str,
    pub suffix: Suffix,
    pub namespace: Option<&'a str>,
}

/// The readings of one name: at most the three cluster readings, the extras and the bare name.
pub type Readings<'a> = smallvec::SmallVec<[Reading<'a>; 8]>;

/// The cluster domain and the extra suffixes, lowercased, without leading or trailing dots.
#[derive(Debug, Clone)]
pub struct SearchList {
    cluster_domain: String,
    /// `.svc.<cluster domain>`, kept to match without allocating.
    dot_svc_cluster: String,
    dot_cluster: String,
    extra: Vec<String>,
    /// How many of `extra` were given (the rest were learned).
    given: usize,
}

impl SearchList {
    pub fn new(cluster_domain: &str, extra: &[String]) -> Self {
        let cd = normalise(cluster_domain).to_string();
        let mut extra: Vec<String> = extra.iter().map(|s| normalise(s).to_string()).collect();
        extra.retain(|s| !s.is_empty());
        extra.truncate(MAX_EXTRA_SUFFIXES);
        Self {
            dot_svc_cluster: format!(".svc.{cd}"),
            dot_cluster: format!(".{cd}"),
            cluster_domain: cd,
            given: extra.len(),
            extra,
        }
    }

    pub fn extra(&self, i: u8) -> &str {
        self.extra.get(i as usize).map_or("", String::as_str)
    }

    pub fn learned(&self) -> &[String] {
        &self.extra[self.given..]
    }

    /// Every reading of `name` (lowercase, no trailing dot), most specific suffix first.
    pub fn readings<'a>(&self, name: &'a str, out: &mut Readings<'a>) {
        out.clear();
        if let Some(rest) = name.strip_suffix(self.dot_svc_cluster.as_str()) {
            if let Some((base, ns)) = rest.rsplit_once('.') {
                if !base.is_empty() && !ns.is_empty() {
                    out.push(Reading {
                        base,
                        suffix: Suffix::Namespace,
                        namespace: Some(ns),
                    });
                }
            }
            push(out, rest, Suffix::Svc);
        }
        if let Some(base) = name.strip_suffix(self.dot_cluster.as_str()) {
            push(out, base, Suffix::Cluster);
        }
        for (i, s) in self.extra.iter().enumerate() {
            let base = name
                .strip_suffix(s.as_str())
                .and_then(|b| b.strip_suffix('.'));
            if let Some(base) = base {
                push(out, base, Suffix::Extra(i as u8));
            }
        }
        push(out, name, Suffix::Bare);
    }

    /// `name` read as `base` + a suffix not known yet: learns it (up to the bound) when it is
    /// no cluster suffix. Node domains come after the cluster suffixes in a pod's search list,
    /// and an operator rarely knows every node's (`ec2.internal`, `<region>.compute.internal`).
    pub fn learn(&mut self, name: &str, base: &str) -> Option<Suffix> {
        let suffix = name.strip_prefix(base)?.strip_prefix('.')?;
        if suffix.is_empty() || suffix.ends_with(&self.cluster_domain) {
            return None;
        }
        if let Some(i) = self.extra.iter().position(|s| s == suffix) {
            return Some(Suffix::Extra(i as u8));
        }
        if self.extra.len() >= MAX_EXTRA_SUFFIXES {
            return None;
        }
        self.extra.push(suffix.to_string());
        Some(Suffix::Extra((self.extra.len() - 1) as u8))
    }

    /// The candidate's name in presentation form, with its trailing dot.
    pub fn candidate_name(&self, base: &str, suffix: Suffix, namespace: Option<&str>) -> String {
        let mut name = String::new();
        self.candidate_name_into(base, suffix, namespace, &mut name);
        name
    }

    /// `candidate_name` into `name`, replacing what it held.
    pub fn candidate_name_into(
        &self,
        base: &str,
        suffix: Suffix,
        namespace: Option<&str>,
        name: &mut String,
    ) {
        // Concatenated, not formatted: one name per candidate of every lookup that ends.
        let cd = self.cluster_domain.as_str();
        let parts: [&str; 4] = match suffix {
            Suffix::Namespace => [namespace.unwrap_or(""), ".svc.", cd, "."],
            Suffix::Svc => ["svc.", cd, ".", ""],
            Suffix::Cluster => [cd, ".", "", ""],
            Suffix::Extra(i) => [self.extra(i), ".", "", ""],
            Suffix::Bare => ["", "", "", ""],
        };
        name.clear();
        name.reserve(base.len() + 2 + parts.iter().map(|p| p.len()).sum::<usize>());
        name.push_str(base);
        name.push('.');
        for p in parts {
            name.push_str(p);
        }
    }
}

fn push<'a>(out: &mut Readings<'a>, base: &'a str, suffix: Suffix) {
    if !base.is_empty() {
        out.push(Reading {
            base,
            suffix,
            namespace: None,
        });
    }
}

/// Lowercase presentation form without the trailing dot (the form the machine compares).
pub fn normalise(name: &str) -> &str {
    // Bytewise: a char pattern costs more than the name (once per query).
    let b = name.as_bytes();
    let start = b.iter().position(|&c| c != b'.').unwrap_or(b.len());
    let end = b.iter().rposition(|&c| c != b'.').map_or(start, |i| i + 1);
    &name[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(list: &SearchList, name: &str) -> Vec<(String, Suffix, Option<String>)> {
        let mut out = Readings::new();
        list.readings(name, &mut out);
        out.iter()
            .map(|r| {
                (
                    r.base.to_string(),
                    r.suffix,
                    r.namespace.map(str::to_string),
                )
            })
            .collect()
    }

    #[test]
    fn a_namespace_candidate_reads_as_short_name_then_longer_bases() {
        let list = SearchList::new("cluster.local", &["node.test".into()]);
        assert_eq!(
            readings(&list, "web.default.svc.cluster.local"),
            vec![
                ("web".into(), Suffix::Namespace, Some("default".into())),
                ("web.default".into(), Suffix::Svc, None),
                ("web.default.svc".into(), Suffix::Cluster, None),
                ("web.default.svc.cluster.local".into(), Suffix::Bare, None),
            ]
        );
        assert_eq!(
            readings(&list, "api.example.test.node.test"),
            vec![
                ("api.example.test".into(), Suffix::Extra(0), None),
                ("api.example.test.node.test".into(), Suffix::Bare, None),
            ]
        );
        // `svc.cluster.local` alone is no candidate of anything but itself.
        assert_eq!(
            readings(&list, "svc.cluster.local"),
            vec![
                ("svc".into(), Suffix::Cluster, None),
                ("svc.cluster.local".into(), Suffix::Bare, None)
            ]
        );
    }

    #[test]
    fn extra_suffixes_are_learned_up_to_the_bound_never_inside_the_cluster_domain() {
        let mut list = SearchList::new("cluster.local", &[]);
        assert_eq!(
            list.learn("api.ec2.internal", "api"),
            Some(Suffix::Extra(0))
        );
        assert_eq!(list.learned(), ["ec2.internal".to_string()]);
        assert_eq!(list.learn("api.cluster.local", "api"), None);
        assert_eq!(list.learn("apix.ec2.internal", "api"), None);
        for i in 1..MAX_EXTRA_SUFFIXES {
            assert!(list.learn(&format!("a.d{i}"), "a").is_some());
        }
        assert_eq!(list.learn("a.one-too-many", "a"), None);
        assert_eq!(
            list.candidate_name("api", Suffix::Extra(0), None),
            "api.ec2.internal."
        );
    }
}
