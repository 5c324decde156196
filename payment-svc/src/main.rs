use clap::Parser as _;
use payment_svc::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init("payment-svc");
    let config = Config::parse();
    config.log();
    let app = App::build(config).await?;
    app.run(runtime::shutdown::on_signal()).await
}
