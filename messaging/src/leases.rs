//! Which process consumes which partition: leases held as PostgreSQL advisory locks, not the
//! broker's group protocol.
//!
//! Every consumer of a group holds, on a connection of its own to its service's database:
//! - a shared "member" lock, so that the members alive can be counted from `pg_locks`;
//! - an exclusive lock per partition it consumes.
//!
//! Each round (every [`ROUND`]) a member takes free partitions up to its fair share
//! (partitions / members, rounded up) and gives back any above it, so two replicas split the
//! partitions between them and a new replica gets its share within a round or two. When a
//! process dies, even by `kill -9`, PostgreSQL ends its session and its locks with it, and the
//! others take its partitions at their next round: no session timeout to wait out.
//!
//! Why not the broker's consumer groups: tansu 0.6's group coordinator loses partitions when
//! members die or join (a dead member's partitions stay assigned to nobody; a dead leader
//! blocks every later rebalance), and the platform's promise must not depend on the broker
//! used for local runs. Offsets are still committed to the broker under the group's id, so
//! Kafka's tools show the group's position and lag; the consumers only never join the group.
//!
//! Leases make the work efficient, not correct: a message handled twice (two holders during
//! a hand-over, or a redelivery) still has one effect through the inbox.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};

/// How often a member checks its leases and the number of members.
pub const ROUND: Duration = Duration::from_secs(1);

/// The second half of the member lock's key; partitions use their index, far below it.
const MEMBER: i32 = i32::MAX;

/// One partition of one topic a consumer reads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Partition {
    pub topic: String,
    pub partition: i32,
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// A member's leases on the partitions of its topics.
pub struct Leases {
    connect: PgConnectOptions,
    /// The group's key: the member lock is `(group_key, MEMBER)`.
    group_key: i32,
    /// Every partition of the group's topics, with the first half of its lock's key.
    partitions: Vec<(Partition, i32)>,
    /// The lease session; `None` until connected, and after it failed.
    conn: Option<PgConnection>,
    /// Indices into `partitions` locked by this member.
    held: BTreeSet<usize>,
    /// Of `held`, those being given back: no longer consumed, unlocked by [`Leases::release`].
    leaving: BTreeSet<usize>,
}

impl Leases {
    /// Leases for `group` over `partitions` (each topic's partition count), in the database
    /// `connect` points at.
    pub fn new(connect: PgConnectOptions, group: &str, partitions: &[(String, i32)]) -> Self {
        let partitions = partitions
            .iter()
            .flat_map(|(topic, count)| {
                let key = key(&format!("{group}/{topic}"));
                (0..*count).map(move |partition| {
                    (
                        Partition {
                            topic: topic.clone(),
                            partition,
                        },
                        key,
                    )
                })
            })
            .collect();
        Self {
            connect,
            group_key: key(group),
            partitions,
            conn: None,
            held: BTreeSet::new(),
            leaving: BTreeSet::new(),
        }
    }

    /// One round: connects if needed, takes free partitions up to this member's fair share and
    /// marks any above it as leaving. Returns the partitions this member should now consume.
    /// If the lease session is lost, that is none: its locks went with it.
    pub async fn round(&mut self) -> BTreeSet<Partition> {
        if let Err(error) = self.try_round().await {
            if self.conn.take().is_some() || !self.held.is_empty() {
                tracing::warn!(%error, "partition leases lost; reconnecting");
            } else {
                tracing::debug!(%error, "partition leases unavailable");
            }
            self.held.clear();
            self.leaving.clear();
        }
        self.consumed()
    }

    /// Unlocks the partitions marked leaving, once the caller no longer consumes them.
    pub async fn release(&mut self) {
        let leaving = std::mem::take(&mut self.leaving);
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        for index in leaving {
            let (partition, key) = &self.partitions[index];
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(key)
                .bind(partition.partition)
                .execute(&mut *conn)
                .await;
            if let Err(error) = unlocked {
                // The session is broken, so its locks are gone anyway.
                tracing::warn!(%error, "releasing a partition lease failed");
                self.conn = None;
                self.held.clear();
                return;
            }
            self.held.remove(&index);
        }
    }

    fn consumed(&self) -> BTreeSet<Partition> {
        self.held
            .difference(&self.leaving)
            .map(|&i| self.partitions[i].0.clone())
            .collect()
    }

    async fn try_round(&mut self) -> Result<(), sqlx::Error> {
        if self.conn.is_none() {
            let mut conn = tokio::time::timeout(
                Duration::from_secs(5),
                PgConnection::connect_with(&self.connect),
            )
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
            sqlx::query("SELECT pg_advisory_lock_shared($1, $2)")
                .bind(self.group_key)
                .bind(MEMBER)
                .execute(&mut conn)
                .await?;
            self.conn = Some(conn);
            self.held.clear();
            self.leaving.clear();
        }
        let conn = self.conn.as_mut().expect("connected above");
        let members: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND classid = $1::bigint::oid AND objid = $2::bigint::oid",
        )
        .bind(i64::from(self.group_key))
        .bind(i64::from(MEMBER))
        .fetch_one(&mut *conn)
        .await?;
        let fair = fair_share(self.partitions.len(), members);
        // Above the fair share: give back the last ones (they are unlocked by `release`).
        self.leaving = self.held.iter().copied().skip(fair).collect();
        // Below it: take free ones, first to last.
        let mut index = 0;
        while self.held.len() < fair && index < self.partitions.len() {
            if !self.held.contains(&index) {
                let (partition, key) = &self.partitions[index];
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(key)
                    .bind(partition.partition)
                    .fetch_one(&mut *conn)
                    .await?;
                if locked {
                    self.held.insert(index);
                }
            }
            index += 1;
        }
        Ok(())
    }
}

/// Partitions per member, rounded up, so that every partition has room with someone.
fn fair_share(partitions: usize, members: i64) -> usize {
    let members = usize::try_from(members.max(1)).unwrap_or(1);
    partitions.div_ceil(members)
}

/// A stable, non-negative 31-bit key for a name (FNV-1a): the same in every process and
/// release, unlike `std`'s hasher.
fn key(name: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::try_from(hash & 0x7fff_ffff).expect("31 bits fit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_gives_every_partition_room() {
        assert_eq!(fair_share(6, 1), 6);
        assert_eq!(fair_share(6, 2), 3);
        assert_eq!(fair_share(6, 4), 2);
        assert_eq!(fair_share(3, 2), 2);
        assert_eq!(fair_share(3, 5), 1);
        // No member counted (the count raced a reconnect): behave as the only one.
        assert_eq!(fair_share(3, 0), 3);
    }

    #[test]
    fn keys_are_stable_and_non_negative() {
        // FNV-1a of "a" is 0xe40c292c; the top bit is dropped.
        assert_eq!(key("a"), 0x640c_292c);
        assert_ne!(
            key("orchestrator/order.events"),
            key("orchestrator/saga.replies")
        );
    }
}
