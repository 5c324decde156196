use inventory_svc::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = telemetry::init(inventory_svc::SERVICE);
    runtime::service::main(telemetry, Config::log, |config, cancel| async move {
        App::build(config).await?.run(cancel).await
    })
    .await
}
