//! What a gRPC server lists through server reflection, in both protocol versions.

/// The services a gRPC server at `url` lists through server reflection in protocol version
/// `v1`, and in `v1alpha` (which Python's grpcio-reflection, Postman, grpcui and grpcurl before
/// 1.9 speak): each list, or the status the server answered with.
pub async fn reflected_services(
    url: &str,
) -> (
    Result<Vec<String>, tonic::Status>,
    Result<Vec<String>, tonic::Status>,
) {
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .expect("gRPC URL")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    (
        v1::list_services(channel.clone()).await,
        v1alpha::list_services(channel).await,
    )
}

/// `list_services` for one protocol version: the two versions' messages are the same but
/// for their package, so their types differ and only the text can be shared.
macro_rules! list_services_in {
    ($version:ident) => {
        mod $version {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;

            pub async fn list_services(
                channel: tonic::transport::Channel,
            ) -> Result<Vec<String>, tonic::Status> {
                let request = ServerReflectionRequest {
                    host: String::new(),
                    message_request: Some(MessageRequest::ListServices(String::new())),
                };
                let mut responses = ServerReflectionClient::new(channel)
                    .server_reflection_info(tokio_stream::iter([request]))
                    .await?
                    .into_inner();
                let response = responses
                    .message()
                    .await?
                    .ok_or_else(|| tonic::Status::unknown("no reflection answer"))?;
                match response.message_response {
                    Some(MessageResponse::ListServicesResponse(list)) => {
                        Ok(list.service.into_iter().map(|s| s.name).collect())
                    }
                    other => Err(tonic::Status::unknown(format!(
                        "unexpected reflection answer {other:?}"
                    ))),
                }
            }
        }
    };
}

list_services_in!(v1);
list_services_in!(v1alpha);
