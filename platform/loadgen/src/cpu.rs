//! CPU time of the platform's processes on this machine, read from `/proc` (Linux), so that the
//! load generator can report CPU time per saga for each service, the broker and PostgreSQL.

use std::collections::BTreeMap;

/// The processes counted, by name, and the command name (`/proc/<pid>/stat`) each is found
/// by: the five services, the broker (a JVM: every `java` process of the machine counts as
/// Kafka, so run nothing else in Java beside a measurement) and PostgreSQL (all of its
/// processes together).
pub const PROCESSES: &[(&str, &str)] = &[
    ("gateway", "gateway"),
    ("order-svc", "order-svc"),
    ("inventory-svc", "inventory-svc"),
    ("payment-svc", "payment-svc"),
    ("orchestrator", "orchestrator"),
    ("kafka", "java"),
    ("postgres", "postgres"),
];

/// `/proc/<pid>/stat` counts in USER_HZ, which Linux fixes at 100 for user space.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system) used so far by the live processes of each name.
#[derive(Clone, Debug, Default)]
pub struct Sample(BTreeMap<&'static str, f64>);

impl Sample {
    /// Reads every process; `None` where `/proc` is not there to read.
    pub fn take() -> Option<Sample> {
        let mut totals = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(stat) = entry
                .file_name()
                .to_str()
                .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|_| std::fs::read_to_string(entry.path().join("stat")).ok())
            else {
                continue;
            };
            if let Some((name, seconds)) = parse_stat(&stat) {
                if let Some((known, _)) = PROCESSES.iter().find(|(_, command)| *command == name) {
                    *totals.entry(*known).or_insert(0.0) += seconds;
                }
            }
        }
        Some(Sample(totals))
    }

    /// Milliseconds of CPU per saga of each process name between `self` and `later`. A process
    /// that exited in between is not counted (PostgreSQL's short-lived backends, say).
    pub fn per_saga(&self, later: &Sample, sagas: u64) -> BTreeMap<String, f64> {
        let sagas = sagas.max(1) as f64;
        later
            .0
            .iter()
            .map(|(name, after)| {
                let before = self.0.get(name).copied().unwrap_or(0.0);
                (
                    (*name).to_owned(),
                    (after - before).max(0.0) * 1000.0 / sagas,
                )
            })
            .collect()
    }
}

/// The command name and CPU seconds of one `/proc/<pid>/stat` line.
fn parse_stat(stat: &str) -> Option<(&str, f64)> {
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so cut at the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14 and stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / TICKS_PER_SECOND))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_and_cpu_time() {
        let line =
            "4242 (inventory-svc) S 1 4242 4242 0 -1 4194560 1 0 0 0 250 75 0 0 20 0 9 0 1 1 1";
        assert_eq!(parse_stat(line), Some(("inventory-svc", 3.25)));
        let odd = "7 (a) b)) R 1 7 7 0 -1 0 0 0 0 0 100 0 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(odd), Some(("a) b)", 1.0)));
    }

    #[test]
    fn per_saga_is_the_difference_over_the_sagas() {
        let before = Sample(BTreeMap::from([("orchestrator", 1.0), ("kafka", 2.0)]));
        let after = Sample(BTreeMap::from([("orchestrator", 1.5), ("kafka", 4.0)]));
        let per = before.per_saga(&after, 100);
        assert_eq!(per["orchestrator"], 5.0);
        assert_eq!(per["kafka"], 20.0);
    }
}
