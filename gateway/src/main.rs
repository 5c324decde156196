use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("gateway");
    let config = gateway::Config::parse();
    config.log();
    let app = gateway::App::build(config).await?;
    app.run(runtime::shutdown::on_signal()).await
}
