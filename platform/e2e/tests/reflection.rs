//! The orchestrator's gRPC servers (its own and the operators' SagaAdmin) answer server
//! reflection in both protocol versions, as the services' do (their own tests check those):
//! clients that know only v1alpha (Python's grpcio-reflection, grpcurl before 1.9, Postman)
//! can browse them too.

use e2e::TestPlatform;
use test_support::reflected_services;

#[tokio::test]
async fn the_orchestrators_servers_answer_reflection_in_v1_and_v1alpha() {
    let platform = TestPlatform::start(&[]).await;
    for (url, service) in [
        (platform.grpc_url("orchestrator"), "grpc.health.v1.Health"),
        (platform.admin_url(), "saga.v1.SagaAdmin"),
    ] {
        let (v1, v1alpha) = reflected_services(&url).await;
        for (version, services) in [("v1", v1), ("v1alpha", v1alpha)] {
            let services =
                services.unwrap_or_else(|status| panic!("{url} reflection {version}: {status}"));
            assert!(
                services.iter().any(|s| s == service),
                "{url} {version}: {services:?}"
            );
        }
    }
}
