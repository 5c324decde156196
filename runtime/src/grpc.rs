//! What every gRPC server of the platform offers besides its own service.

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Server reflection over every package of `proto/`, so `grpcurl` needs no proto files.
/// Serve [`reflection_v1alpha`] beside it: many clients speak only that version.
pub fn reflection() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(reflection_builder().build_v1()?)
}

/// [`reflection`] in the protocol's older version, `grpc.reflection.v1alpha`, which Python's
/// grpcio-reflection, Postman, grpcui and grpcurl before 1.9 speak (and only it).
pub fn reflection_v1alpha() -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(reflection_builder().build_v1alpha()?)
}

/// The standard gRPC health service, reporting `S` (and the server as a whole) as serving
/// with nothing to probe (a stand-in for a service, in tests); a service's own is
/// [`crate::health::serve`], which probes its dependencies.
pub async fn health<S: tonic::server::NamedService>(
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    crate::health::serve::<S>(Vec::new(), tokio_util::sync::CancellationToken::new()).await
}

/// Accepts connections on an already bound listener (bound by the caller, so that tests can
/// use port 0 and read the address back).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// What a server-streaming RPC built by [`keyset_stream`] returns.
pub type ServerStream<T> = tokio_stream::wrappers::ReceiverStream<Result<T, tonic::Status>>;

/// A server stream of rows read one page at a time with keyset pagination, so that listing
/// any number of rows holds one page in memory and no transaction stays open.
///
/// `fetch(after)` reads up to `page_size` rows whose key comes after `after` (`None`: from the
/// start), in key order, each with its key. The stream ends after a page shorter than
/// `page_size`, or as soon as the client goes away; a failed fetch ends it with that status.
pub fn keyset_stream<K, T, F, Fut>(page_size: usize, mut fetch: F) -> ServerStream<T>
where
    K: Send + 'static,
    T: Send + 'static,
    F: FnMut(Option<K>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<(K, T)>, tonic::Status>> + Send,
{
    let page_size = page_size.max(1);
    // One page in flight while the next is read.
    let (tx, rx) = tokio::sync::mpsc::channel(page_size);
    tokio::spawn(async move {
        let mut after = None;
        loop {
            let page = match fetch(after.take()).await {
                Ok(page) => page,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let last_page = page.len() < page_size;
            for (key, item) in page {
                if tx.send(Ok(item)).await.is_err() {
                    return; // the client went away
                }
                after = Some(key);
            }
            if last_page {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// [`keyset_stream`] over the rows of a table: `fetch(pool, after, limit)` reads up to `limit`
/// rows after `after` from `pool`, and `item` makes each row its key and message. A database
/// error ends the stream with the status [`crate::error::database_status`] gives it, for
/// `service`.
pub fn table_stream<K, R, T, F, Fut>(
    service: &'static str,
    pool: sqlx::PgPool,
    page_size: usize,
    fetch: F,
    item: fn(R) -> (K, T),
) -> ServerStream<T>
where
    K: Send + 'static,
    R: Send + 'static,
    T: Send + 'static,
    F: Fn(sqlx::PgPool, Option<K>, i64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Vec<R>, sqlx::Error>> + Send,
{
    let limit = i64::try_from(page_size).unwrap_or(i64::MAX);
    keyset_stream(page_size, move |after| {
        let page = fetch(pool.clone(), after, limit);
        async move {
            let rows = page
                .await
                .map_err(|e| crate::error::database_status(service, &e))?;
            Ok(rows.into_iter().map(item).collect())
        }
    })
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::keyset_stream;

    #[tokio::test]
    async fn pages_are_read_after_the_last_key_until_a_short_page() {
        let rows: Vec<u32> = (1..=7).collect();
        let stream = keyset_stream(3, move |after: Option<u32>| {
            let page: Vec<(u32, u32)> = rows
                .iter()
                .filter(|r| after.is_none_or(|a| **r > a))
                .take(3)
                .map(|r| (*r, *r * 10))
                .collect();
            async move { Ok(page) }
        });
        let got: Vec<u32> = stream.map(|r| r.expect("row")).collect().await;
        assert_eq!(got, [10, 20, 30, 40, 50, 60, 70]);
    }

    #[tokio::test]
    async fn a_failed_page_ends_the_stream_with_its_status() {
        let mut calls = 0;
        let stream = keyset_stream(2, move |_after: Option<u32>| {
            calls += 1;
            let result = if calls == 1 {
                Ok(vec![(1, 1), (2, 2)])
            } else {
                Err(tonic::Status::unavailable("database down"))
            };
            async move { result }
        });
        let got: Vec<Result<u32, tonic::Status>> = stream.collect().await;
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[2].as_ref().expect_err("error").code(),
            tonic::Code::Unavailable
        );
    }
}
