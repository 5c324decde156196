//! The operators' command line, `sagactl` (the built binary), against the five real services:
//! it lists, shows, aborts and refuses as an operator needs, and its audit passes on a clean
//! run and names every order, payment, reservation and SKU that a corruption made on purpose
//! breaks.

use std::process::Output;
use std::time::Duration;

use e2e::TestPlatform;
use serde_json::{json, Value};
use sqlx::Connection as _;

const SAGA_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the built `sagactl` against `platform`, with `args` after the platform's addresses.
async fn sagactl(platform: &TestPlatform, args: &[&str]) -> Output {
    sagactl_with_token(platform, &platform.admin_token(), args).await
}

async fn sagactl_with_token(platform: &TestPlatform, token: &str, args: &[&str]) -> Output {
    let bin_dir = platform::services::binary_dir();
    let binary = bin_dir.join("sagactl");
    assert!(
        binary.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins`",
        binary.display()
    );
    // A test of an old sagactl would pass or fail for code that is no longer there.
    if let Err(e) = platform::services::check_fresh_binaries(&bin_dir, &["sagactl"]) {
        panic!("{e:#}");
    }
    let mut command = tokio::process::Command::new(&binary);
    for variable in [
        "SAGA_ADMIN_URL",
        "SAGA_ADMIN_TOKEN",
        "ORDER_SVC_URL",
        "INVENTORY_SVC_URL",
        "PAYMENT_SVC_URL",
    ] {
        command.env_remove(variable);
    }
    let output = command
        .args([
            "--admin-url",
            &platform.admin_url(),
            "--admin-token",
            token,
            "--order-url",
            &platform.grpc_url("order-svc"),
            "--inventory-url",
            &platform.grpc_url("inventory-svc"),
            "--payment-url",
            &platform.grpc_url("payment-svc"),
        ])
        .args(args)
        .output()
        .await
        .expect("run sagactl");
    eprintln!(
        "$ sagactl {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Places an order through the gateway with `correlation_id`; returns its id.
async fn place(
    platform: &TestPlatform,
    sku: &str,
    quantity: u32,
    method: &str,
    correlation_id: &str,
) -> String {
    let response = platform
        .http
        .post(format!("{}/orders", platform.gateway))
        .header("X-Correlation-ID", correlation_id)
        .json(&json!({
            "items": [{"sku": sku, "quantity": quantity}],
            "payment_method": method,
        }))
        .send()
        .await
        .expect("POST /orders");
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.expect("json");
    let order_id = body["order_id"].as_str().expect("order_id").to_owned();
    platform
        .wait_for_order(&order_id, SAGA_TIMEOUT, |o| o["payment_id"].is_string())
        .await;
    order_id
}

/// Waits for the order's payment and verifies it; returns the order once final.
async fn verify(platform: &TestPlatform, order_id: &str) -> Value {
    let initiated = platform
        .wait_for_order(order_id, SAGA_TIMEOUT, |o| o["payment_id"].is_string())
        .await;
    let (status, body) = platform
        .post(
            "/payment/verify",
            &json!({ "payment_id": initiated["payment_id"] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    platform
        .wait_for_order(order_id, SAGA_TIMEOUT, |o| {
            o["status"] == "COMPLETED" || o["status"] == "FAILED"
        })
        .await
}

/// Waits until no saga waits for order-svc to confirm its order (an order is final a moment
/// before its saga hears so).
async fn wait_for_confirmations(platform: &TestPlatform) {
    let deadline = std::time::Instant::now() + SAGA_TIMEOUT;
    loop {
        let listed = sagactl(
            platform,
            &[
                "list",
                "--state",
                "completing",
                "--state",
                "failing",
                "--json",
            ],
        )
        .await;
        assert!(listed.status.success(), "{}", stderr(&listed));
        let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
        if listed.as_array().is_some_and(|a| a.is_empty()) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sagas still unconfirmed: {listed}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn execute(url: &str, sql: &str, order_id: &str) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("database");
    let changed = sqlx::query(sql)
        .bind(uuid::Uuid::parse_str(order_id).expect("uuid"))
        .execute(&mut conn)
        .await
        .expect("corrupt")
        .rows_affected();
    assert_eq!(changed, 1, "{sql}");
}

#[tokio::test]
async fn operators_list_show_abort_and_audit_the_platform_with_sagactl() {
    let platform = TestPlatform::start(&[]).await;
    // One after the other, so that their sagas start in this order.
    let completed = place(&platform, "SKU-MOUSE", 2, "pm_card_visa", "ops-corr-1").await;
    let also_completed = place(&platform, "SKU-KEYBOARD", 1, "pm_card_visa", "ops-corr-2").await;
    let declined = place(
        &platform,
        "SKU-WEBCAM",
        1,
        "pm_card_chargeDeclined",
        "ops-corr-3",
    )
    .await;
    let waiting = place(&platform, "SKU-HEADSET", 1, "pm_card_visa", "ops-corr-4").await;
    assert_eq!(verify(&platform, &completed).await["status"], "COMPLETED");
    assert_eq!(
        verify(&platform, &also_completed).await["status"],
        "COMPLETED"
    );
    assert_eq!(verify(&platform, &declined).await["status"], "FAILED");
    wait_for_confirmations(&platform).await;

    // list: every saga, newest first, with its state.
    let listed = sagactl(&platform, &["list"]).await;
    assert!(listed.status.success());
    let table = stdout(&listed);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(rows[0].starts_with(&waiting) && rows[0].contains("AWAITING_VERIFICATION"));
    assert!(rows[1].starts_with(&declined) && rows[1].contains("FAILED"));
    assert!(rows[1].contains("payment failed"), "{}", rows[1]);
    assert!(rows[3].starts_with(&completed) && rows[3].contains("COMPLETED"));
    assert!(table.trim_end().ends_with("4 sagas"), "{table}");

    let finished = sagactl(&platform, &["list", "--state", "completed", "--json"]).await;
    let finished: Value = serde_json::from_slice(&finished.stdout).expect("JSON");
    let ids: Vec<&str> = finished
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["saga_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [also_completed.as_str(), completed.as_str()]);

    // show: one line per transition, then where the saga stands.
    let shown = sagactl(&platform, &["show", &completed]).await;
    assert!(shown.status.success());
    let timeline = stdout(&shown);
    let transitions: Vec<&str> = timeline.lines().filter(|l| l.contains(" -> ")).collect();
    assert_eq!(transitions.len(), 6, "{timeline}");
    assert!(transitions[0].contains("START -> RESERVING"));
    assert!(transitions[0].contains("OrderCreated <- order.v1.OrderCreated"));
    assert!(transitions[0].contains("sent ReserveInventory, StartDeadline"));
    assert!(transitions[1].contains("RESERVING -> CHARGING"));
    assert!(transitions[1].contains("inventory.v1.InventoryReserved"));
    assert!(transitions[4].contains("COMMITTING -> COMPLETING"));
    assert!(transitions[4].contains("sent CompleteOrder"));
    assert!(transitions[5].contains("COMPLETING -> COMPLETED"));
    assert!(transitions[5].contains("OrderCompleted <- order.v1.OrderCompleted"));
    assert!(transitions
        .iter()
        .all(|t| t.contains("correlation ops-corr-1")));
    assert!(
        timeline.contains("state        COMPLETED since"),
        "{timeline}"
    );
    assert!(timeline.contains("2 x SKU-MOUSE @ 29.00 USD; total 58.00 USD"));

    // The audit of a clean platform: a few orders completed and failed, one in flight.
    let clean = sagactl(&platform, &["audit"]).await;
    assert_eq!(clean.status.code(), Some(0), "{}", stderr(&clean));
    assert_eq!(
        stdout(&clean).trim(),
        "audit: 4 orders, 4 payments, 4 reservations, 5 SKUs checked; 0 violations"
    );

    // abort: the saga compensates now and the order fails with the reason.
    let aborted = sagactl(
        &platform,
        &[
            "abort",
            &waiting,
            "--reason",
            "customer asked to cancel by phone",
        ],
    )
    .await;
    assert!(aborted.status.success());
    assert!(
        stdout(&aborted).contains("aborted; now COMPENSATING"),
        "{}",
        stdout(&aborted)
    );
    let failed = platform
        .wait_for_order(&waiting, SAGA_TIMEOUT, |o| o["status"] == "FAILED")
        .await;
    assert!(failed["failure_reason"]
        .as_str()
        .unwrap_or_default()
        .contains("customer asked to cancel by phone"));
    wait_for_confirmations(&platform).await;
    let history = stdout(&sagactl(&platform, &["show", &waiting]).await);
    assert!(
        history.contains("Abort <- operator.AbortSaga admin:"),
        "{history}"
    );
    assert!(history.contains("reason \"customer asked to cancel by phone\""));
    assert!(history.contains("VoidPayment(\"aborted by an operator: customer asked"));
    assert!(history.contains("COMPENSATING -> FAILING"));
    assert!(history.contains("FAILING -> FAILED"));

    // Refusals say why, and exit 1; a wrong token or an unreachable service exit 2.
    let refused = sagactl(&platform, &["retry", &completed]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("refused: saga") && stderr(&refused).contains("COMPLETED"),
        "{}",
        stderr(&refused)
    );
    let stranger = sagactl_with_token(&platform, "not-the-token", &["list"]).await;
    assert_eq!(stranger.status.code(), Some(2));
    assert!(stderr(&stranger).contains("the admin token was refused"));
    let unreachable = sagactl(&platform, &["audit", "--order-url", "http://127.0.0.1:9"]).await;
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(stderr(&unreachable).contains("cannot reach order-svc"));

    // Still clean after the abort; then corrupt three things behind the services' backs.
    let clean = sagactl(&platform, &["audit"]).await;
    assert_eq!(clean.status.code(), Some(0), "{}", stdout(&clean));
    execute(
        &platform.config.database_url("payments"),
        "UPDATE payments SET status = 'REFUNDED' WHERE order_id = $1",
        &completed,
    )
    .await;
    execute(
        &platform.config.database_url("inventory"),
        "UPDATE reservation_lines SET quantity = 5 WHERE reservation_id = \
         (SELECT reservation_id FROM reservations WHERE order_id = $1)",
        &also_completed,
    )
    .await;
    let mut inventory = sqlx::PgConnection::connect(&platform.config.database_url("inventory"))
        .await
        .expect("inventory database");
    sqlx::query("UPDATE stock SET available = available - 3 WHERE sku = 'SKU-MONITOR'")
        .execute(&mut inventory)
        .await
        .expect("corrupt stock");

    let audit = sagactl(&platform, &["audit"]).await;
    assert_eq!(audit.status.code(), Some(1), "{}", stderr(&audit));
    let report = stdout(&audit);
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 4, "{report}");
    let payment_id = platform.get(&format!("/orders/{completed}")).await.1["payment_id"]
        .as_str()
        .expect("payment_id")
        .to_owned();
    assert!(
        lines.contains(
            &format!(
        "VIOLATION completed-order-payment order={completed} payment={payment_id}: the order is \
         COMPLETED but its payment is REFUNDED, not SUCCEEDED"
    )
            .as_str()
        ),
        "{report}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "VIOLATION completed-order-stock order={also_completed} reservation="
        )) && l
            .ends_with("the reservation holds SKU-KEYBOARD x5, the order is for SKU-KEYBOARD x1")),
        "{report}"
    );
    assert!(
        lines.iter().any(
            |l| l.starts_with("VIOLATION stock-conservation sku=SKU-MONITOR: ")
                && l.contains("3 vanished")
        ),
        "{report}"
    );
    assert_eq!(
        lines[3],
        "audit: 4 orders, 4 payments, 4 reservations, 5 SKUs checked; 3 violations"
    );

    let json_audit = sagactl(&platform, &["audit", "--json"]).await;
    assert_eq!(json_audit.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&json_audit.stdout).expect("JSON");
    assert_eq!(json["checked"]["orders"], 4);
    assert_eq!(json["checked"]["violations"], 3);
    let checks: Vec<&str> = json["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .map(|v| v["check"].as_str().expect("check"))
        .collect();
    assert_eq!(
        checks,
        [
            "completed-order-payment",
            "completed-order-stock",
            "stock-conservation"
        ]
    );
}

/// Seeds `n` completed orders straight into the three services' databases (consistent with
/// each other, as sagas would leave them).
async fn seed_completed_orders(platform: &TestPlatform, n: i64) {
    let run = |database: &'static str, statements: Vec<String>| {
        let url = platform.config.database_url(database);
        async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("database");
            for sql in statements {
                sqlx::query(&sql).execute(&mut conn).await.expect("seed");
            }
        }
    };
    // Ids made from the row number, the same in every database.
    let ids = format!("FROM generate_series(1, {n}) AS i");
    tokio::join!(
        run(
            "orders",
            vec![
                format!(
                    "INSERT INTO orders (order_id, customer_id, status, total_cents, currency, \
                     payment_method, payment_id, request_fingerprint, correlation_id) \
                     SELECT md5('o' || i)::uuid, 'seeded', 'COMPLETED', 5800, 'USD', \
                     'pm_card_visa', md5('p' || i)::uuid, '', '' {ids}"
                ),
                format!(
                    "INSERT INTO order_lines (order_id, sku, quantity, unit_price_cents) \
                     SELECT md5('o' || i)::uuid, 'SKU-MOUSE', 2, 2900 {ids}"
                ),
            ]
        ),
        run(
            "payments",
            vec![format!(
                "INSERT INTO payments (payment_id, order_id, amount_cents, currency, \
                 payment_method, status) \
                 SELECT md5('p' || i)::uuid, md5('o' || i)::uuid, 5800, 'USD', 'pm_card_visa', \
                 'SUCCEEDED' {ids}"
            )]
        ),
        run(
            "inventory",
            vec![
                format!(
                    "INSERT INTO reservations (reservation_id, order_id, status, expires_at) \
                     SELECT md5('r' || i)::uuid, md5('o' || i)::uuid, 'COMMITTED', now() {ids}"
                ),
                format!(
                    "INSERT INTO reservation_lines (reservation_id, sku, quantity) \
                     SELECT md5('r' || i)::uuid, 'SKU-MOUSE', 2 {ids}"
                ),
                format!(
                    "UPDATE stock SET committed = committed + {q}, received = received + {q} \
                     WHERE sku = 'SKU-MOUSE'",
                    q = 2 * n
                ),
            ]
        ),
    );
}

/// The audit streams every list in pages: 5,000 orders cross several pages of each. (At a
/// hundred thousand orders it took 6.5 s with release binaries; see the README.)
#[tokio::test]
async fn the_audit_streams_thousands_of_orders_page_by_page() {
    let platform = TestPlatform::start(&[]).await;
    seed_completed_orders(&platform, 5_000).await;
    let started = std::time::Instant::now();
    let audit = sagactl(&platform, &["audit"]).await;
    assert_eq!(audit.status.code(), Some(0), "{}", stderr(&audit));
    assert_eq!(
        stdout(&audit).trim(),
        "audit: 5000 orders, 5000 payments, 5000 reservations, 5 SKUs checked; 0 violations"
    );
    eprintln!("audit of 5,000 orders took {:?}", started.elapsed());
}
