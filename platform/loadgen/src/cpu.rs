//! CPU time of the platform's processes on this machine, read from `/proc` (Linux), so that the
//! load generator can report CPU time per saga for each service, the broker and PostgreSQL.

use std::collections::BTreeMap;
use std::path::Path;

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

/// The threads of a JVM that compile its hot methods: HotSpot names them `C1 CompilerThread0`,
/// `C2 CompilerThread0` and so on, which `/proc` cuts to 15 bytes.
const JIT_COMPILER_THREADS: &[&str] = &["C1 CompilerThre", "C2 CompilerThre"];

/// CPU seconds (user + system) used so far by the live processes of each name, and of them
/// by the broker JVM's JIT compiler threads.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    processes: BTreeMap<&'static str, f64>,
    kafka_jit: f64,
}

impl Sample {
    /// Reads every process; `None` where `/proc` is not there to read.
    pub fn take() -> Option<Sample> {
        Sample::take_from(Path::new("/proc"))
    }

    /// Reads every process of a `/proc`-shaped directory.
    fn take_from(proc: &Path) -> Option<Sample> {
        let mut sample = Sample::default();
        for entry in std::fs::read_dir(proc).ok()?.flatten() {
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
                    *sample.processes.entry(*known).or_insert(0.0) += seconds;
                    if *known == "kafka" {
                        sample.kafka_jit += jit_compiler_seconds(&entry.path());
                    }
                }
            }
        }
        Some(sample)
    }

    /// Milliseconds of CPU per saga of each process name between `self` and `later`. A process
    /// that exited in between is not counted (PostgreSQL's short-lived backends, say).
    pub fn per_saga(&self, later: &Sample, sagas: u64) -> BTreeMap<String, f64> {
        later
            .processes
            .iter()
            .map(|(name, after)| {
                let before = self.processes.get(name).copied().unwrap_or(0.0);
                ((*name).to_owned(), ms_per_saga(before, *after, sagas))
            })
            .collect()
    }

    /// Milliseconds of CPU per saga that the broker JVM's JIT compilers used between `self` and
    /// `later` (part of Kafka's): high while the broker is still compiling its hot paths after
    /// a start, near nothing once they are compiled. `None` when no broker runs here.
    pub fn kafka_jit_per_saga(&self, later: &Sample, sagas: u64) -> Option<f64> {
        later
            .processes
            .contains_key("kafka")
            .then(|| ms_per_saga(self.kafka_jit, later.kafka_jit, sagas))
    }
}

/// Milliseconds per saga of the CPU seconds used from `before` to `after` (never negative).
fn ms_per_saga(before: f64, after: f64, sagas: u64) -> f64 {
    (after - before).max(0.0) * 1000.0 / sagas.max(1) as f64
}

/// CPU seconds of the JIT compiler threads of the process whose `/proc` directory is `process`.
fn jit_compiler_seconds(process: &Path) -> f64 {
    let Ok(threads) = std::fs::read_dir(process.join("task")) else {
        return 0.0;
    };
    threads
        .flatten()
        .filter_map(|thread| std::fs::read_to_string(thread.path().join("stat")).ok())
        .filter_map(|stat| {
            parse_stat(&stat)
                .filter(|(name, _)| JIT_COMPILER_THREADS.iter().any(|jit| name.starts_with(jit)))
                .map(|(_, seconds)| seconds)
        })
        .sum()
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
    use std::path::PathBuf;

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
        let before = Sample {
            processes: BTreeMap::from([("orchestrator", 1.0), ("kafka", 2.0)]),
            kafka_jit: 0.5,
        };
        let after = Sample {
            processes: BTreeMap::from([("orchestrator", 1.5), ("kafka", 4.0)]),
            kafka_jit: 0.75,
        };
        let per = before.per_saga(&after, 100);
        assert_eq!(per["orchestrator"], 5.0);
        assert_eq!(per["kafka"], 20.0);
        assert_eq!(before.kafka_jit_per_saga(&after, 100), Some(2.5));
        let no_broker = Sample {
            processes: BTreeMap::from([("orchestrator", 1.5)]),
            kafka_jit: 0.0,
        };
        assert_eq!(before.kafka_jit_per_saga(&no_broker, 100), None);
    }

    /// A `/proc`-shaped directory: a broker JVM with two compiler threads and a worker, a
    /// service, and an unrelated process.
    #[test]
    fn the_brokers_jit_compiler_threads_are_counted_apart_within_kafka() {
        let proc = std::env::temp_dir().join(format!("loadgen-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc);
        let stat = |path: PathBuf, pid: &str, name: &str, ticks: u32| {
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(
                path.join("stat"),
                format!("{pid} ({name}) S 1 1 1 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0 1 1 1"),
            )
            .unwrap();
        };
        stat(proc.join("100"), "100", "java", 900);
        stat(proc.join("100/task/101"), "101", "C2 CompilerThre", 300);
        stat(proc.join("100/task/102"), "102", "C1 CompilerThre", 50);
        stat(proc.join("100/task/103"), "103", "data-plane-kafk", 400);
        stat(proc.join("200"), "200", "orchestrator", 120);
        stat(proc.join("300"), "300", "bash", 70);
        let sample = Sample::take_from(&proc).unwrap();
        std::fs::remove_dir_all(&proc).unwrap();
        assert_eq!(sample.processes.get("kafka"), Some(&9.0));
        assert_eq!(sample.processes.get("orchestrator"), Some(&1.2));
        assert_eq!(sample.processes.len(), 2);
        assert_eq!(sample.kafka_jit, 3.5);
    }
}
