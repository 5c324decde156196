//! The OpenAPI document checked in as `gateway/openapi.json` is the one the gateway serves, so
//! that a change to the API shows in review. `UPDATE_OPENAPI=1` rewrites the file.

mod common;

use common::{closed_url, Gateway};

const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

#[tokio::test]
async fn the_checked_in_document_is_the_served_one() {
    let generated = gateway::openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(CHECKED_IN, &generated).expect("writing openapi.json");
    }
    let url = closed_url();
    let gateway = Gateway::start(&url, &url, &url, 10_000).await;
    let response = reqwest::get(gateway.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let served = response.text().await.unwrap();
    gateway.stop().await;
    assert_eq!(served, generated);
    let checked_in = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
    assert!(
        checked_in == served,
        "gateway/openapi.json differs from the document the gateway serves; \
         run `UPDATE_OPENAPI=1 cargo test -p gateway --test openapi` and review the change"
    );

    let document: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    for (path, method) in [
        ("/orders", "post"),
        ("/orders", "get"),
        ("/orders/{order_id}", "get"),
        ("/payment/verify", "post"),
        ("/products", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        let operation = &document["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is documented");
        let secured = operation["security"].is_array();
        assert_eq!(
            secured,
            path.starts_with("/orders") || path == "/payment/verify",
            "{method} {path}: security"
        );
        if secured {
            assert!(
                operation["responses"]["401"].is_object(),
                "{method} {path}: 401"
            );
        }
    }
    assert_eq!(
        document["components"]["securitySchemes"]["customer"]["scheme"],
        "bearer"
    );
}
