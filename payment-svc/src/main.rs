use payment_svc::{App, Config};

fn main() -> anyhow::Result<()> {
    runtime::service::main(
        || telemetry::init(payment_svc::SERVICE),
        |config: &Config| &config.threads,
        Config::log,
        |config, cancel| async move { App::build(config).await?.run(cancel).await },
    )
}
