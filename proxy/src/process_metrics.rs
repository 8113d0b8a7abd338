//! The process's own metrics, under the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`, ...), read
//! from `/proc/self` at each scrape: nothing runs between scrapes. Elsewhere than Linux there is
//! no `/proc`, and nothing is rendered. Imports nothing of the crate.

use std::fmt::Write as _;

/// The kernel reports CPU times in USER_HZ ticks, which Linux fixes at 100 a second for
/// userspace on every architecture (`sysconf(_SC_CLK_TCK)` would say so, at the price of libc).
const TICKS_PER_SECOND: f64 = 100.0;

/// What `/proc/self` says, as `(name, type, help, value)`, in exposition order.
fn sample() -> Vec<(&'static str, &'static str, &'static str, f64)> {
    let mut families = Vec::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces: field 14
    // (utime) is index 11 here, 15 (stime) 12, 22 (starttime) 19.
    let after_name: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| after_name.get(i).and_then(|v| v.parse::<f64>().ok());
    if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
        let help = "Total user and system CPU time spent in seconds";
        families.push(("process_cpu_seconds_total", "counter", help, (user + system) / TICKS_PER_SECOND));
    }
    let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|text| {
        text.lines().find_map(|line| line.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(boot_time), Some(start)) = (boot_time, ticks(19)) {
        let help = "Start time of the process since the Unix epoch in seconds";
        families.push(("process_start_time_seconds", "gauge", help, boot_time + start / TICKS_PER_SECOND));
    }
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok().map(|v| v * 1024.0))
    };
    if let Some(rss) = kib("VmRSS:") {
        families.push(("process_resident_memory_bytes", "gauge", "Resident memory size in bytes", rss));
    }
    if let Some(size) = kib("VmSize:") {
        families.push(("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes", size));
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        // Reading the directory holds one descriptor of its own: not counted.
        let open = entries.count().saturating_sub(1) as f64;
        families.push(("process_open_fds", "gauge", "Number of open file descriptors", open));
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|text| {
        let line = text.lines().find(|line| line.starts_with("Max open files"))?;
        line.trim_start_matches("Max open files").split_whitespace().next()?.parse::<f64>().ok()
    });
    if let Some(max) = max_fds {
        families.push(("process_max_fds", "gauge", "Maximum number of open file descriptors", max));
    }
    let threads = status.lines().find_map(|line| line.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok());
    if let Some(threads) = threads {
        families.push(("process_threads", "gauge", "Number of OS threads in the process", threads));
    }
    families
}

/// Appends the process's families, each with its `# HELP` and `# TYPE`.
pub fn render(out: &mut String) {
    for (name, kind, help, value) in sample() {
        // Writing to a String does not fail.
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_usual_process_families_are_read_from_proc() {
        let families = sample();
        let value = |name: &str| families.iter().find(|f| f.0 == name).map(|f| f.3);
        // A test binary has its stdio, its executable and more open, and a few MiB resident.
        assert!(value("process_open_fds").is_some_and(|n| n >= 3.0), "{families:?}");
        assert!(value("process_resident_memory_bytes").is_some_and(|n| n > 1024.0 * 1024.0), "{families:?}");
        assert!(value("process_max_fds").is_some_and(|n| n >= value("process_open_fds").unwrap()), "{families:?}");
        assert!(value("process_threads").is_some_and(|n| n >= 1.0), "{families:?}");
        assert!(value("process_cpu_seconds_total").is_some_and(|n| n >= 0.0), "{families:?}");
        // After 2001-09-09 (10^9 s), before 2100.
        assert!(value("process_start_time_seconds").is_some_and(|t| t > 1e9 && t < 4.1e9), "{families:?}");
        let mut text = String::new();
        render(&mut text);
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"), "{text}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn open_fds_follow_the_files_the_process_opens() {
        let open = || sample().iter().find(|f| f.0 == "process_open_fds").map(|f| f.3).unwrap();
        let before = open();
        let files: Vec<_> = (0..20).map(|_| std::fs::File::open("/proc/self/stat").unwrap()).collect();
        // Other tests open and close files meanwhile: at least most of these twenty show.
        assert!(open() >= before + 10.0, "{before} then {}", open());
        drop(files);
    }
}
