//! What every gRPC server of the platform offers besides its own service.

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

/// Server reflection over every package of `proto/`, so `grpcurl` needs no proto files.
pub fn reflection() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?)
}

/// The standard gRPC health service, reporting `S` (and the server as a whole) as serving.
pub async fn health<S: tonic::server::NamedService>(
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_serving::<S>().await;
    service
}

/// Accepts connections on an already bound listener (bound by the caller, so that tests can
/// use port 0 and read the address back).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
