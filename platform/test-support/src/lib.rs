//! Shared by the integration tests of every crate: the real PostgreSQL and broker, with each
//! test isolated in its own database and its own topic prefix.
//!
//! Tests never skip: when PostgreSQL or the broker cannot be reached they fail with a message
//! saying how to start them.

mod reflection;

use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::ClientConfig;
use sqlx::Connection as _;

pub use reflection::reflected_services;

/// Polls `check` until it returns `Some`, failing after `within` with what was awaited.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Server URL (any database) for the test databases; `cargo run -p platform -- test` sets it.
pub const DATABASE_ENV: &str = "TEST_DATABASE_URL";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@localhost:5432/postgres";
/// Bootstrap brokers for tests.
pub const KAFKA_ENV: &str = "TEST_KAFKA_BROKERS";
pub const DEFAULT_KAFKA_BROKERS: &str = "localhost:9092";

const HOW_TO_START: &str = "run the tests with `cargo run -p platform -- test`, which starts \
PostgreSQL and the broker, or start them with `cargo run -p platform -- infra` and keep it running";

/// Prefix of every database made by tests, so a test run can drop those of earlier runs.
pub const TEST_DATABASE_PREFIX: &str = "test_";

fn server_url() -> String {
    std::env::var(DATABASE_ENV).unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// A connection to the test server, or a panic with directions when it is not reachable.
async fn connect_server() -> (String, sqlx::PgConnection) {
    let server = server_url();
    match sqlx::PgConnection::connect(&server).await {
        Ok(conn) => (server, conn),
        Err(e) => panic!(
            "PostgreSQL is not reachable at {server} ({DATABASE_ENV}): {e}.\nTo fix: {HOW_TO_START}."
        ),
    }
}

/// The URL of the test server (any database), after checking that it answers. Panics with
/// directions otherwise.
pub async fn database_server() -> String {
    connect_server().await.0
}

/// `server_url` with its database replaced by `database`.
pub fn with_database(server_url: &str, database: &str) -> String {
    // sqlx parses its URLs with the same crate, so a server it connected to parses here.
    let mut url = url::Url::parse(server_url)
        .unwrap_or_else(|e| panic!("the PostgreSQL URL {server_url} is not a URL: {e}"));
    url.set_path(database);
    url.into()
}

/// The URL of database `name` on the test server.
pub fn database_url(name: &str) -> String {
    with_database(&server_url(), name)
}

/// A short random id for names of databases and topics.
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// Creates a fresh, empty database for one test and returns its URL. Panics with directions
/// when PostgreSQL is not reachable.
pub async fn fresh_database(label: &str) -> String {
    let name = format!(
        "{TEST_DATABASE_PREFIX}{}_{}",
        label.replace('-', "_"),
        unique_suffix()
    );
    let (_, mut conn) = connect_server().await;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
    database_url(&name)
}

/// The statements `work` runs in the database of `pool`, each with how often, by
/// PostgreSQL's `pg_stat_statements` (which the platform's PostgreSQL loads, the tests' one
/// included), so that a test can say how many round trips an operation takes. A consumer's
/// upkeep ([`is_upkeep`]) is left out; nothing else may run in that database meanwhile (a
/// built, not running, service), or the test keeps only the statements it asserts on (a
/// running service's relay reads the outbox).
pub async fn statements_of<T>(
    pool: &sqlx::PgPool,
    work: impl Future<Output = T>,
) -> (T, Vec<(String, i64)>) {
    const THIS_DATABASE: &str = "(SELECT oid FROM pg_database WHERE datname = current_database())";
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("pg_stat_statements: {e}.\nTo fix: run the tests with `cargo run -p platform -- test`, whose PostgreSQL loads it, or add pg_stat_statements to shared_preload_libraries of yours"));
    sqlx::query(&format!(
        "SELECT pg_stat_statements_reset(0, {THIS_DATABASE}, 0)"
    ))
    .execute(pool)
    .await
    .expect("resetting pg_stat_statements");
    let out = work.await;
    let mut statements: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT query, calls FROM pg_stat_statements WHERE dbid = {THIS_DATABASE} \
         AND query NOT LIKE '%pg_stat_statements%' ORDER BY query"
    ))
    .fetch_all(pool)
    .await
    .expect("reading pg_stat_statements");
    statements.retain(|(q, _)| !is_upkeep(q));
    (out, statements)
}

/// Whether `query` is upkeep a running service's consumer does on its own clock, not part of
/// an operation: the purge of inbox rows past their retention, which runs when the consumer
/// starts and then every quarter of the retention (at most ten minutes), so it can land in the
/// window of [`statements_of`] of a test whose service runs.
fn is_upkeep(query: &str) -> bool {
    query.starts_with("DELETE FROM inbox ")
}

/// Of `statements` ([`statements_of`]), the operation's own: not its transaction's `BEGIN`
/// and `COMMIT`, the outbox rows and the relay's wake-up every writer adds, the settings of
/// a connection the pool opened meanwhile.
pub fn own_statements(statements: Vec<(String, i64)>) -> Vec<(String, i64)> {
    statements
        .into_iter()
        .filter(|(q, _)| {
            !(q == "BEGIN"
                || q == "COMMIT"
                || q.starts_with("SET ")
                || q.starts_with("WITH i AS (INSERT INTO outbox")
                || q.starts_with("SELECT pg_notify"))
        })
        .collect()
}

/// The broker's address, after checking that it answers. Panics with directions otherwise.
pub fn kafka_brokers() -> String {
    let brokers = std::env::var(KAFKA_ENV).unwrap_or_else(|_| DEFAULT_KAFKA_BROKERS.to_owned());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("log_level", "0")
        .create()
        .unwrap_or_else(|e| panic!("Kafka client for {brokers}: {e}"));
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!("The Kafka broker is not reachable at {brokers} ({KAFKA_ENV}): {e}.\nTo fix: {HOW_TO_START}.");
    }
    brokers
}

/// A topic prefix of its own for one test, e.g. `t3f9a0c1b2d.`.
pub fn topic_prefix() -> String {
    format!("t{}.", unique_suffix())
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://postgres@localhost:5432/postgres", "orders"),
            "postgres://postgres@localhost:5432/orders"
        );
        assert_eq!(
            with_database("postgres://u:p@db:5432?sslmode=disable", "orders"),
            "postgres://u:p@db:5432/orders?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://u@h/x?sslmode=disable", "y"),
            "postgres://u@h/y?sslmode=disable"
        );
    }
}
