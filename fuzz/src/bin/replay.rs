//! Runs a target's check over files without AFL: `replay <target> [--classify] PATH...`
//! (files or directories, e.g. an AFL queue or `fuzz/regressions/<target>`). Reports every
//! input whose check panics and exits 1 if any did. `--classify` (dnstap_scan, dns_question)
//! also counts which decoder accepted each input and prints an example of each case.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let classify = args
        .iter()
        .position(|a| a == "--classify")
        .map(|i| args.remove(i))
        .is_some();
    if args.len() < 2 {
        eprintln!("usage: replay <target> [--classify] PATH...");
        std::process::exit(2);
    }
    let target = args.remove(0);
    let Some((_, check)) = dnstap_analyser_fuzz::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
    else {
        eprintln!("unknown target {target}");
        std::process::exit(2);
    };
    let mut files = Vec::new();
    for a in &args {
        collect(Path::new(a), &mut files);
    }
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = 0;
    let mut classes: BTreeMap<String, (usize, PathBuf)> = BTreeMap::new();
    for f in &files {
        let data = std::fs::read(f).expect("read input");
        match std::panic::catch_unwind(|| check(&data)) {
            Ok(()) => {}
            Err(e) => {
                failed += 1;
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("FAIL {}: {msg}", f.display());
                continue;
            }
        }
        if classify {
            let class = match target.as_str() {
                "dnstap_scan" => {
                    format!("{:?}", dnstap_analyser_fuzz::dnstap_scan::classify(&data))
                }
                "dns_question" => {
                    format!("{:?}", dnstap_analyser_fuzz::dns_question::classify(&data))
                }
                _ => "n/a".into(),
            };
            let e = classes.entry(class).or_insert((0, f.clone()));
            e.0 += 1;
        }
    }
    for (class, (n, example)) in &classes {
        println!("{class}: {n} (e.g. {})", example.display());
    }
    println!("{target}: {} inputs, {failed} failed", files.len());
    if failed > 0 {
        std::process::exit(1);
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) {
    let hidden = p
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    if hidden && p.parent().is_some() {
        // AFL keeps links to queue entries under .state/: count each input once.
        return;
    }
    if p.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out);
        }
    } else if p.is_file() && p.extension().is_none_or(|e| e != "md") {
        out.push(p.to_path_buf());
    }
}
