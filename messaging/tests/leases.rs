//! Partition leases against a real PostgreSQL: members of a group split the partitions, a
//! member that joins gets its share, and the partitions of a member whose session ends (as
//! when its process is killed) go to the others at their next round.

use std::collections::BTreeSet;

use messaging::leases::{Leases, Partition};
use sqlx::postgres::PgConnectOptions;

fn partitions() -> Vec<(String, i32)> {
    vec![("order.events".into(), 3), ("saga.replies".into(), 3)]
}

async fn member(url: &str, group: &str) -> Leases {
    let options: PgConnectOptions = url.parse().expect("database url");
    Leases::new(options, group, &partitions())
}

fn all() -> BTreeSet<Partition> {
    partitions()
        .into_iter()
        .flat_map(|(topic, count)| {
            (0..count).map(move |partition| Partition {
                topic: topic.clone(),
                partition,
            })
        })
        .collect()
}

#[tokio::test]
async fn members_split_partitions_and_take_over_those_of_a_member_that_died() {
    let url = platform::testing::fresh_database("leases").await;
    let mut a = member(&url, "orchestrator").await;
    let first = a.round().await;
    assert_eq!(first, all(), "a lone member reads every partition");

    // A second member: nothing is free until the first gives back what is above its share.
    let mut b = member(&url, "orchestrator").await;
    assert!(
        b.round().await.is_empty(),
        "the first member still holds them all"
    );
    let kept = a.round().await;
    assert_eq!(
        kept.len(),
        3,
        "the first member keeps its fair share: {kept:?}"
    );
    a.release().await;
    let taken = b.round().await;
    assert_eq!(
        taken.len(),
        3,
        "the second member takes the rest: {taken:?}"
    );
    assert!(kept.is_disjoint(&taken), "no partition is read by both");
    assert_eq!(
        kept.union(&taken).cloned().collect::<BTreeSet<_>>(),
        all(),
        "every partition is read by someone"
    );
    // Stable: further rounds change nothing.
    assert_eq!(a.round().await, kept);
    assert_eq!(b.round().await, taken);

    // Another group on the same database is independent.
    let mut other = member(&url, "inventory-svc").await;
    assert_eq!(other.round().await, all());

    // The first member dies: its session ends, and with it its locks.
    drop(a);
    let mut after = BTreeSet::new();
    for _ in 0..50 {
        after = b.round().await;
        if after.len() == 6 {
            break;
        }
        // PostgreSQL ends the dead session's backend asynchronously.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(after, all(), "the survivor took over every partition");
}
