//! Server reflection in both protocol versions, so that clients of either can browse the API.

mod common;

use common::TestApp;

#[tokio::test]
async fn reflection_lists_the_service_in_v1_and_v1alpha() {
    let app = TestApp::start().await;
    let (v1, v1alpha) = test_support::reflected_services(&app.grpc_url).await;
    for (version, services) in [("v1", v1), ("v1alpha", v1alpha)] {
        let services = services.unwrap_or_else(|status| panic!("reflection {version}: {status}"));
        assert!(
            services.iter().any(|s| s == "payment.v1.PaymentService"),
            "{version}: {services:?}"
        );
    }
}
