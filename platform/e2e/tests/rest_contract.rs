//! The REST API as its clients meet it: customers see and act on their own orders only, an
//! unusable token is a 401, and Schemathesis, driven by the gateway's own OpenAPI document,
//! finds nothing against the live platform.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use e2e::{TestPlatform, TEST_CUSTOMER};
use reqwest::header::AUTHORIZATION;
use reqwest::StatusCode;
use serde_json::{json, Value};

const REQUIREMENTS: &str = "platform/e2e/test-tools/requirements.txt";
/// Schemathesis' settings, shared with runs by hand.
const CONFIG: &str = "platform/e2e/test-tools/schemathesis.toml";

/// Schemathesis' command, after checking that it runs; fails (never skips) when it does not.
fn schemathesis() -> &'static str {
    let command = "st";
    match std::process::Command::new(command)
        .arg("--version")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(output) if output.status.success() => command,
        Ok(output) => panic!(
            "`{command} --version` failed ({}): {}\nTo fix: pip install -r {REQUIREMENTS}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => panic!(
            "Schemathesis (`{command}`) is not on PATH ({e}).\nTo fix: pip install -r {REQUIREMENTS}"
        ),
    }
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.expect("the gateway answers");
    let status = response.status();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn schemathesis_finds_nothing_over_every_operation() {
    let st = schemathesis();
    let platform = TestPlatform::start(&[]).await;
    platform.warm_up().await;
    // An order of the token's customer with a payment, so that reads and verifications find
    // something.
    let order_id = platform.place_order("SKU-MOUSE", 1, "pm_card_visa").await;
    let payment_id = platform.payment_id(&order_id).await;

    let served = platform
        .http
        .get(format!("{}/openapi.json", platform.gateway))
        .send()
        .await
        .expect("GET /openapi.json")
        .text()
        .await
        .expect("the document");
    let checked_in =
        std::fs::read_to_string(platform::workspace_root().join("gateway/openapi.json"))
            .expect("gateway/openapi.json");
    assert!(
        served == checked_in,
        "the served OpenAPI document differs from gateway/openapi.json"
    );
    let document = platform.log_dir.join("openapi.json");
    std::fs::write(&document, &served).expect("writing openapi.json");
    let report_dir: PathBuf = platform.log_dir.join("schemathesis");

    let config = platform.log_dir.join("schemathesis.toml");
    let shared = std::fs::read_to_string(platform::workspace_root().join(CONFIG)).expect(CONFIG);
    std::fs::write(
        &config,
        format!(
            "{shared}\n[dictionaries.payments]\nvalues = [\"{payment_id}\"]\n\n\
             [[operations]]\ninclude-name = \"POST /payment/verify\"\n\
             parameters = {{ \"body.payment_id\" = {{ dictionary = \"payments\", probability = 0.5 }} }}\n"
        ),
    )
    .expect("writing schemathesis.toml");
    let token = platform.token(TEST_CUSTOMER);
    let output = tokio::process::Command::new(st)
        .arg("--config-file")
        .arg(&config)
        .args(["run", "--checks", "all", "--workers", "1", "--no-color"])
        .arg("--url")
        .arg(&platform.gateway)
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        .arg("--report")
        .arg("junit")
        .arg("--report-dir")
        .arg(&report_dir)
        .arg(&document)
        .env("SCHEMATHESIS_HOOKS", "")
        // Its caches (`.schemathesis/`) go beside the platform's logs, not into the tree.
        .current_dir(&platform.log_dir)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(900), output)
        .await
        .expect("Schemathesis ends within 15 minutes")
        .expect("Schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "Schemathesis found problems ({}); its report is in {}:\n{stdout}\n{stderr}",
        output.status,
        report_dir.display()
    );
    // Every operation of the document was tested.
    let operations = operations(&served);
    for line in [
        format!("Selected: {operations}/{operations}"),
        format!("Tested: {operations}"),
    ] {
        assert!(stdout.contains(&line), "no `{line}` in:\n{stdout}");
    }
}

/// How many operations the document has.
fn operations(document: &str) -> usize {
    let document: Value = serde_json::from_str(document).expect("JSON");
    document["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().expect("path item").len())
        .sum()
}

#[tokio::test]
async fn a_customer_reads_lists_verifies_and_places_their_own_orders_only() {
    let platform = TestPlatform::start(&[]).await;
    let url = |path: &str| format!("{}{path}", platform.gateway);
    let alice = format!("Bearer {}", platform.token("alice"));
    let bob = format!("Bearer {}", platform.token("bob"));

    let place = |authorization: &str, body: Value| {
        platform
            .http
            .post(url("/orders"))
            .header(AUTHORIZATION, authorization)
            .json(&body)
    };
    let order =
        json!({"items": [{"sku": "SKU-MOUSE", "quantity": 1}], "payment_method": "pm_card_visa"});
    let mut placed = Vec::new();
    for _ in 0..3 {
        let (status, _, body) = send(place(&alice, order.clone())).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["customer_id"], "alice");
        placed.push(body["order_id"].as_str().unwrap().to_owned());
    }
    let mut for_alice = order.clone();
    for_alice["customer_id"] = "alice".into();
    let (status, _, body) = send(place(&bob, for_alice.clone())).await;
    assert_eq!(status, 403, "bob cannot place an order for alice: {body}");
    let (status, _, _) = send(place(&alice, for_alice)).await;
    assert_eq!(status, 201, "alice may name herself");

    let first = placed[0].clone();
    let payment_id = {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, _, body) = send(
                platform
                    .http
                    .get(url(&format!(
                        "/orders/{first}?wait_while=PENDING&timeout_ms=5000"
                    )))
                    .header(AUTHORIZATION, &alice),
            )
            .await;
            if let Some(id) = body["payment_id"].as_str() {
                break id.to_owned();
            }
            assert!(std::time::Instant::now() < deadline, "no payment: {body}");
        }
    };

    // Bob reading, long-polling and verifying alice's order: the 404 of what does not exist.
    let unknown_order = uuid::Uuid::now_v7().to_string();
    let get = |authorization: &str, id: &str, query: &str| {
        platform
            .http
            .get(url(&format!("/orders/{id}{query}")))
            .header(AUTHORIZATION, authorization)
    };
    let (status, _, theirs) = send(get(
        &bob,
        &first,
        "?wait_while=PAYMENT_INITIATED&timeout_ms=5000",
    ))
    .await;
    assert_eq!(status, 404, "{theirs}");
    let (status, _, none) = send(get(&bob, &unknown_order, "")).await;
    assert_eq!(status, 404);
    assert_eq!(
        theirs["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&first, "ID"),
        none["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&unknown_order, "ID"),
    );
    let verify = |authorization: &str, payment_id: &str| {
        platform
            .http
            .post(url("/payment/verify"))
            .header(AUTHORIZATION, authorization)
            .json(&json!({ "payment_id": payment_id }))
    };
    let unknown_payment = uuid::Uuid::now_v7().to_string();
    let (status, _, theirs) = send(verify(&bob, &payment_id)).await;
    assert_eq!(status, 404, "{theirs}");
    let (status, _, none) = send(verify(&bob, &unknown_payment)).await;
    assert_eq!(status, 404);
    assert_eq!(
        theirs["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&payment_id, "ID"),
        none["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&unknown_payment, "ID"),
    );
    let (status, _, body) = send(get(&alice, &first, "")).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("PAYMENT_INITIATED")),
        "not verified by bob"
    );
    let (status, _, body) = send(verify(&alice, &payment_id)).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("SUCCEEDED")),
        "{body}"
    );

    // Listing: alice's four orders newest first, two at a time; bob has none.
    let list = |authorization: &str, query: String| {
        platform
            .http
            .get(url(&format!("/orders{query}")))
            .header(AUTHORIZATION, authorization)
    };
    let (status, _, page) = send(list(&bob, String::new())).await;
    assert_eq!(status, 200);
    assert_eq!(page, json!({"orders": [], "next_cursor": null}));
    let mut listed = Vec::new();
    let mut query = "?limit=2".to_owned();
    loop {
        let (status, _, page) = send(list(&alice, query.clone())).await;
        assert_eq!(status, 200, "{page}");
        for order in page["orders"].as_array().unwrap() {
            assert_eq!(order["customer_id"], "alice");
            listed.push(order["order_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(listed.len(), 4, "{listed:?}");
    assert_eq!(
        &listed[1..],
        placed.iter().rev().cloned().collect::<Vec<_>>().as_slice(),
        "newest first"
    );
}

#[tokio::test]
async fn a_missing_expired_unsigned_wrongly_signed_or_misaddressed_token_is_401() {
    use base64::Engine as _;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    let platform = TestPlatform::start(&[]).await;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = |aud: &str, exp: u64| json!({"sub": "alice", "iss": "order-platform", "aud": aud, "exp": exp});
    let sign = |claims: Value, secret: &str| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let secret = platform.jwt_secret();
    let cases = [
        ("missing", None),
        (
            "expired",
            Some(sign(claims("order-api", now - 3600), &secret)),
        ),
        (
            "alg none",
            Some(format!(
                "{}.{}.",
                b64(json!({"alg": "none", "typ": "JWT"})),
                b64(claims("order-api", now + 600))
            )),
        ),
        (
            "wrongly signed",
            Some(sign(claims("order-api", now + 600), "not-the-secret")),
        ),
        (
            "the development secret",
            Some(sign(
                claims("order-api", now + 600),
                gateway::identity::DEV_JWT_SECRET,
            )),
        ),
        (
            "wrong audience",
            Some(sign(claims("another-api", now + 600), &secret)),
        ),
    ];
    let client = reqwest::Client::new();
    for (why, token) in cases {
        let mut request = client.get(format!("{}/orders", platform.gateway));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let (status, headers, body) = send(request).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert!(headers.contains_key("www-authenticate"), "{why}");
        assert_eq!(body["error"]["code"], "unauthorized", "{why}: {body}");
    }
    let (status, _, _) = send(client.get(format!("{}/products", platform.gateway))).await;
    assert_eq!(status, 200, "the catalog is open");
}
