//! The `process_*` families every Prometheus client library exports (CPU, memory, file
//! descriptors, start time), read from `/proc/self` at scrape as the Go client does; absent
//! where there is no `/proc`.

use std::fs;

/// Clock ticks per second of `/proc/<pid>/stat`: USER_HZ, 100 on every Linux architecture's
/// user ABI (the Go client assumes the same).
const USER_HZ: f64 = 100.0;

/// One reading of the process's resources.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    /// The soft limit on open files; `None` when unlimited.
    pub max_fds: Option<u64>,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` when a file is missing or unreadable.
    pub fn read() -> Option<Self> {
        let stat = fs::read_to_string("/proc/self/stat").ok()?;
        let status = fs::read_to_string("/proc/self/status").ok()?;
        let limits = fs::read_to_string("/proc/self/limits").ok()?;
        let boot = fs::read_to_string("/proc/stat").ok()?;
        let open_fds = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        let (ticks, start_ticks) = parse_stat(&stat)?;
        Some(Self {
            cpu_seconds: ticks as f64 / USER_HZ,
            resident_bytes: status_kib(&status, "VmRSS:")? * 1024,
            virtual_bytes: status_kib(&status, "VmSize:")? * 1024,
            // The directory's own handle is one of them while it is read.
            open_fds: open_fds.saturating_sub(1),
            max_fds: max_open_files(&limits)?,
            start_time_seconds: boot_time(&boot)? as f64 + start_ticks as f64 / USER_HZ,
        })
    }
}

/// (utime + stime, starttime) in ticks from `/proc/<pid>/stat`. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: utime is field 14, starttime field 22.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(22)?))
}

/// A `kB` line of `/proc/<pid>/status`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The soft "Max open files" of `/proc/<pid>/limits`: `Some(None)` when unlimited.
fn max_open_files(limits: &str) -> Option<Option<u64>> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(None),
        n => n.parse().ok().map(Some),
    }
}

/// `btime` of `/proc/stat`: the boot time in seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("btime "))?;
    line["btime ".len()..].trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed_field_by_field() {
        // A command name with a space and a parenthesis, as a process may choose.
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 25 0 0 20 0 9 0 \
                    123456 900000 300 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((175, 123456)));
        let status = "Name:\tx\nVmSize:\t  900000 kB\nVmRSS:\t    1200 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(1200));
        assert_eq!(status_kib(status, "VmSize:"), Some(900000));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(Some(1024)));
        let unlimited = "Max open files            unlimited            unlimited            files";
        assert_eq!(max_open_files(unlimited), Some(None));
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1765000000\n"),
            Some(1765000000)
        );
    }

    #[test]
    fn this_process_reads_as_alive() {
        let p = ProcessStats::read().expect("/proc on Linux");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_seconds > 946_684_800.0 && p.start_time_seconds <= now + 1.0);
        assert!(p.resident_bytes > 0 && p.virtual_bytes >= p.resident_bytes);
        // stdin, stdout, stderr at least; this file is open while it counts.
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let with_file = ProcessStats::read().unwrap().open_fds;
        drop(file);
        assert!(with_file >= 4, "{with_file}");
        assert!(p.max_fds.is_none_or(|m| m >= with_file));
        assert!(p.cpu_seconds >= 0.0);
    }
}
