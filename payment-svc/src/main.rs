use clap::Parser as _;
use payment_svc::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = telemetry::init(payment_svc::SERVICE);
    let config = Config::parse();
    config.log();
    let result = async {
        let app = App::build(config).await?;
        app.run(runtime::shutdown::on_signal()).await
    }
    .await;
    telemetry.shutdown().await;
    result
}
