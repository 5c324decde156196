fn main() -> anyhow::Result<()> {
    runtime::service::main(
        || telemetry::init("gateway"),
        |config: &gateway::Config| &config.threads,
        gateway::Config::log,
        |config, cancel| async move { gateway::App::build(config).await?.run(cancel).await },
    )
}
