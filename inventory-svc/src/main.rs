use clap::Parser as _;
use inventory_svc::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("inventory-svc");
    let config = Config::parse();
    config.log();
    let app = App::build(config).await?;
    app.run(runtime::shutdown::on_signal()).await
}
