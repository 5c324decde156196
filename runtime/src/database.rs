//! Connecting a service to its own database and migrating it.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use backon::{BackoffBuilder, ExponentialBuilder};
use sqlx::error::BoxDynError;
use sqlx::migrate::{MigrateDatabase, MigrateError, Migration, MigrationSource, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres};

/// How long a starting service waits for PostgreSQL before giving up.
const WAIT_FOR_DATABASE: Duration = Duration::from_secs(60);

/// Connects to the service's database, creating it if missing, and runs the migrations of
/// `migrators` as one history, by version (the shared messaging tables' below 100, then the
/// service's own). Waits for PostgreSQL to come up for a while, so that services may start
/// before it.
pub async fn connect(
    url: &str,
    max_connections: u32,
    migrators: &[&Migrator],
) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .with_context(|| format!("invalid database URL {}", crate::redact_url(url)))?;
    let options = options.log_statements(tracing::log::LevelFilter::Trace);
    let started = Instant::now();
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .build();
    loop {
        match try_connect(url, &options, max_connections).await {
            Ok(pool) => {
                combine(migrators)
                    .await
                    .context("combining the migrations")?
                    .run(&pool)
                    .await
                    .context("running database migrations")?;
                return Ok(pool);
            }
            Err(e) if started.elapsed() < WAIT_FOR_DATABASE => {
                let delay = delays.next().unwrap_or(Duration::from_secs(2));
                tracing::warn!(
                    error = format!("{e:#}"),
                    ?delay,
                    "database not ready, retrying"
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "PostgreSQL at {} did not answer within {WAIT_FOR_DATABASE:?}",
                    crate::redact_url(url)
                )))
            }
        }
    }
}

/// One migrator holding every migration of `migrators`, by version, so that each service's
/// history is checked whole in its one `_sqlx_migrations` table: a version applied there that
/// none of them knows (a newer release's) is an error, as it is for a single migrator. The
/// shared crates' versions are below 100, a service's from 100.
async fn combine(migrators: &[&Migrator]) -> Result<Migrator, MigrateError> {
    let mut migrations: Vec<Migration> = migrators.iter().flat_map(|m| m.iter().cloned()).collect();
    migrations.sort_by_key(|m| m.version);
    migrator(migrations).await
}

/// A migrator of `migrations` (in the order given), with sqlx's defaults: locking, and a
/// version applied in the database that none of them knows is an error.
pub async fn migrator(migrations: Vec<Migration>) -> Result<Migrator, MigrateError> {
    Migrator::new(Resolved(migrations)).await
}

/// Migrations already resolved (read by `sqlx::migrate!` at build time), as a source for
/// [`Migrator::new`].
#[derive(Debug)]
struct Resolved(Vec<Migration>);

impl MigrationSource<'static> for Resolved {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(std::future::ready(Ok(self.0)))
    }
}

async fn try_connect(
    url: &str,
    options: &PgConnectOptions,
    max_connections: u32,
) -> anyhow::Result<PgPool> {
    if !Postgres::database_exists(url).await? {
        // Two services starting at once may race to create it; losing that race is fine.
        if let Err(e) = Postgres::create_database(url).await {
            if !Postgres::database_exists(url).await? {
                return Err(e.into());
            }
        }
    }
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // No round trip to ping a connection at every acquire (a saga acquires some twenty
        // times): a connection that died (PostgreSQL restarted) fails its first statement with
        // an I/O error, which callers retry as transient, and the pool replaces it.
        .test_before_acquire(false)
        .after_connect(|conn, _| Box::pin(async move { prefer_keys(conn).await }))
        .connect_with(options.clone())
        .await?)
}

/// Every statement of a service finds its rows by key, and is planned once per connection.
///
/// PostgreSQL keeps a prepared statement's plan while its tables change: one made while a
/// table was small (a new database, a queue just vacuumed to zero pages) is a sequential scan,
/// which it kept using as the table grew until the next autovacuum (a saga's read scanning
/// 4,000 rows, the relay's delete every dead row of the outbox). The one statement that should
/// scan (the relay's backlog count) turns scans back on for itself.
///
/// And by default it plans a statement afresh for its parameters at its first five executions
/// and at every one after whenever that plan looks cheaper than the generic one: inventory's
/// settle (a `CASE` on a parameter) was planned at every execution, its planning costing more
/// than its execution. The services' statements take keys and arrays of keys, whose plan does
/// not depend on their values: the generic plan, made once, is the plan.
///
/// Set on each of a service's connections (a `SET`, not a startup option, which some poolers
/// refuse).
pub async fn prefer_keys(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(
        conn,
        "SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan",
    )
    .await?;
    Ok(())
}

pub use crate::error::is_transient;
