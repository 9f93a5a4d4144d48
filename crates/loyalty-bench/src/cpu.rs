//! Where the CPU went during a scenario: the server process, this load generator, and the
//! whole machine (from /proc). On a 2-core box the client, the server and PostgreSQL share
//! the cores, so a throughput figure means little without these.

use std::time::Instant;

/// Linux reports process times in USER_HZ ticks, which is 100 per second on every
/// architecture (the value is part of the user-space ABI).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU use over an interval, in percent: of one core for processes (200 % = two cores
/// busy), of all cores for the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuUse {
    pub server_pct: Option<f64>,
    pub client_pct: Option<f64>,
    pub machine_pct: Option<f64>,
}

pub struct CpuMeter {
    started: Instant,
    server: Option<(u32, f64)>,
    client: Option<f64>,
    machine: Option<MachineTicks>,
}

impl CpuMeter {
    /// `server`: the server process to watch, if any; `client`: whether this process is the
    /// load generator of the interval (not while pgbench runs).
    pub fn start(server: Option<u32>, client: bool) -> CpuMeter {
        CpuMeter {
            started: Instant::now(),
            server: server.and_then(|pid| Some((pid, process_cpu_seconds(pid)?))),
            client: if client {
                process_cpu_seconds(std::process::id())
            } else {
                None
            },
            machine: machine_ticks(),
        }
    }

    pub fn finish(self) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64();
        let pct = |before: f64, after: Option<f64>| {
            after
                .filter(|_| wall > 0.0)
                .map(|a| (a - before) / wall * 100.0)
        };
        CpuUse {
            server_pct: self
                .server
                .and_then(|(pid, before)| pct(before, process_cpu_seconds(pid))),
            client_pct: self
                .client
                .and_then(|before| pct(before, process_cpu_seconds(std::process::id()))),
            machine_pct: self
                .machine
                .zip(machine_ticks())
                .and_then(|(before, after)| busy_pct(before, after)),
        }
    }
}

/// How busy the machine is over `sample` while the bench itself sends nothing: anything well
/// above zero is someone else's load, and it will skew every figure of the run.
pub async fn background_busy_pct(sample: std::time::Duration) -> Option<f64> {
    let before = machine_ticks()?;
    tokio::time::sleep(sample).await;
    busy_pct(before, machine_ticks()?)
}

/// User + system CPU seconds of a process so far.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    parse_process_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_process_stat(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); field 3 is the first after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct MachineTicks {
    busy: u64,
    total: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    parse_machine_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal ...
fn parse_machine_stat(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some(MachineTicks {
        busy: total - idle,
        total,
    })
}

fn busy_pct(before: MachineTicks, after: MachineTicks) -> Option<f64> {
    let total = after.total.checked_sub(before.total)?;
    let busy = after.busy.checked_sub(before.busy)?;
    (total > 0).then(|| busy as f64 / total as f64 * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_times_are_read_after_the_name() {
        let stat = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 5000 0 0 0 250 50 0 0 20 0 \
                    9 0 1000 100000000 2500 18446744073709551615";
        assert_eq!(parse_process_stat(stat), Some(3.0));
        assert_eq!(parse_process_stat("garbage"), None);
        assert!(process_cpu_seconds(std::process::id()).is_some());
    }

    #[test]
    fn machine_busy_share_excludes_idle_and_iowait() {
        let before = parse_machine_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        let after = parse_machine_stat("cpu  250 0 150 800 100 0 0 0 0 0\n").unwrap();
        assert_eq!(
            before,
            MachineTicks {
                busy: 200,
                total: 1000
            }
        );
        assert_eq!(busy_pct(before, after), Some(200.0 / 300.0 * 100.0));
        assert_eq!(busy_pct(after, before), None);
    }
}
