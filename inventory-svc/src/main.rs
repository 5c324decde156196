use inventory_svc::{App, Config};

fn main() -> anyhow::Result<()> {
    runtime::service::main(
        || telemetry::init(inventory_svc::SERVICE),
        |config: &Config| &config.threads,
        Config::log,
        |config, cancel| async move { App::build(config).await?.run(cancel).await },
    )
}
