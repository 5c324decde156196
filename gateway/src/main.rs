use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = telemetry::init("gateway");
    let config = gateway::Config::parse();
    config.log();
    let result = async {
        let app = gateway::App::build(config).await?;
        app.run(runtime::shutdown::on_signal()).await
    }
    .await;
    telemetry.shutdown().await;
    result
}
