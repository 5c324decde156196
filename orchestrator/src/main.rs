use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = telemetry::init(orchestrator::SERVICE);
    let config = orchestrator::Config::parse();
    config.log();
    let cancel = runtime::shutdown::on_signal();
    let result = async {
        let app = orchestrator::App::build(config).await?;
        app.run(cancel).await
    }
    .await;
    telemetry.shutdown().await;
    result
}
