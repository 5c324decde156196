//! The broker goes down for a few seconds in the middle of sagas: every service keeps running,
//! retries, and catches up once it is back; every saga finishes.

use std::time::Duration;

use e2e::TestPlatform;
use futures::future::join_all;
use platform::infra;
use test_support::unique_suffix;

#[tokio::test]
async fn sagas_in_flight_finish_after_the_broker_was_killed_and_restarted() {
    // A broker of this test's own, so that other tests keep theirs.
    let dir = platform::services::binary_dir()
        .join("test-brokers")
        .join(unique_suffix());
    let port = platform::services::free_port().expect("free port").port();
    let broker = infra::Broker::start(&dir, port)
        .await
        .expect("start the broker");
    let brokers = format!("127.0.0.1:{port}");
    let platform = TestPlatform::start_with_brokers(&brokers, &[]).await;
    platform.warm_up().await;
    let before = platform.stock("SKU-KEYBOARD").await;

    let mut orders =
        join_all((0..10).map(|_| platform.place_order("SKU-KEYBOARD", 1, "pm_card_visa"))).await;
    // kill -9 while those sagas are under way.
    broker.kill().await;
    // Orders are still taken while the broker is down: they wait in the order service's outbox.
    orders.extend(
        join_all((0..5).map(|_| platform.place_order("SKU-KEYBOARD", 1, "pm_card_visa"))).await,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let broker = infra::Broker::start(&dir, port)
        .await
        .expect("restart the broker");

    platform.verify_and_expect_completed(&orders).await;
    let after = platform.stock("SKU-KEYBOARD").await;
    assert_eq!(after.reserved, before.reserved);
    assert_eq!(
        after.committed - before.committed,
        orders.len() as i64,
        "each order sold once"
    );
    assert_eq!(before.available - after.available, orders.len() as i64);
    broker.stop(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
