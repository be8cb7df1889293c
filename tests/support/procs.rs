//! CPU time and memory of a process and its descendants, from /proc: what the benchmark compares between
//! imapgate, nginx and HAProxy (each measured around the same work, in the same run).

/// `root` and every process below it.
pub fn family(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|v| v.parse().ok())) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, p)| *p == parent).map(|(c, _)| *c));
        i += 1;
    }
    found
}

/// The fields of /proc/<pid>/stat after the command name (which may hold spaces): state, ppid, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User + system CPU time of `pids`, in milliseconds (Linux's USER_HZ is 100: 10 ms ticks).
pub fn cpu_ms(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| stat_fields(*pid))
        .map(|f| {
            // utime and stime are fields 14 and 15 of proc(5), 12 and 13 after the name.
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (ticks(11) + ticks(12)) * 10.0
        })
        .sum()
}

/// Proportional set size of `pids` in KiB (shared pages split among the processes sharing them).
pub fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter().map(|pid| field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")).sum()
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    field_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

fn field_kib(path: &str, name: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
