//! CPU time and peak memory of processes, from `/proc` (Linux only).
//!
//! - A process's CPU is `utime + stime` of `/proc/<pid>/stat` (user + system,
//!   all threads), in clock ticks converted to seconds.
//! - Peak RSS is `VmHWM` of `/proc/<pid>/status`: the high-water mark of the
//!   resident set, read just before the process is stopped.
//! - PostgreSQL is a tree of processes under the postmaster. Its CPU is the
//!   postmaster's own time plus its reaped children's (`cutime + cstime`,
//!   backends that already exited) plus the live children's `utime + stime`.

use std::sync::OnceLock;

/// Clock ticks per second (`getconf CLK_TCK`, 100 on every common Linux).
pub fn clock_ticks() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/<pid>/stat` the harness uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    /// Parent pid.
    pub ppid: u32,
    /// User time of the process itself (ticks).
    pub utime: u64,
    /// System time of the process itself (ticks).
    pub stime: u64,
    /// User time of reaped children (ticks).
    pub cutime: u64,
    /// System time of reaped children (ticks).
    pub cstime: u64,
    /// The process state letter (`Z` for a zombie).
    pub state: char,
}

/// Parses the text of `/proc/<pid>/stat`. The command name may contain
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): index 0 = field 3.
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: u32::try_from(field(4)?).ok()?,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// `/proc/<pid>/stat` of a live process.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// User + system CPU seconds of one process (its own threads only).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = stat(pid)?;
    Some((s.utime + s.stime) as f64 / clock_ticks())
}

/// Parses a `kB` line (`VmHWM:   12345 kB`) of `/proc/<pid>/status`.
pub fn parse_status_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Peak resident set (VmHWM) of a live process, in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kb(&text, "VmHWM").map(|kb| kb * 1024)
}

/// Total CPU seconds of a process tree rooted at `root` that reaps its
/// children (the postmaster): its own time, its reaped children's, and its
/// live direct children's.
pub fn tree_cpu_secs(root: u32) -> Option<f64> {
    let r = stat(root)?;
    let mut ticks = r.utime + r.stime + r.cutime + r.cstime;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = stat(pid) {
                if s.ppid == root && s.state != 'Z' {
                    ticks += s.utime + s.stime + s.cutime + s.cstime;
                }
            }
        }
    }
    Some(ticks as f64 / clock_ticks())
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Total busy CPU seconds of the whole machine (all cores, `/proc/stat`),
/// to see how much of a run's CPU was spent by processes outside the run.
pub fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    Some(busy as f64 / clock_ticks())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let text = "1234 (postgres: walsender (x) 1) S 99 1234 1234 0 -1 4194560 5 0 0 0 250 30 7 3 20 0 1 0 100 0 0";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.ppid, 99);
        assert_eq!(s.utime, 250);
        assert_eq!(s.stime, 30);
        assert_eq!(s.cutime, 7);
        assert_eq!(s.cstime, 3);
        assert_eq!(s.state, 'S');
    }

    #[test]
    fn parses_status_kb() {
        let text = "Name:\tjava\nVmPeak:\t 999 kB\nVmHWM:\t   51200 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_status_kb(text, "VmHWM"), Some(51200));
        assert_eq!(parse_status_kb(text, "VmRSS"), Some(100));
        assert_eq!(parse_status_kb(text, "Vm"), None);
    }

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(cpu_secs(me).is_some());
        assert!(peak_rss_bytes(me).unwrap() > 0);
    }
}
