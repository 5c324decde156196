use clap::Parser as _;
use order_svc::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init(order_svc::SERVICE);
    let config = Config::parse();
    config.log();
    let app = App::build(config).await?;
    app.run(runtime::shutdown::on_signal()).await
}
