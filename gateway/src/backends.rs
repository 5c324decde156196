//! gRPC clients of the services behind the gateway.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use proto::inventory::v1::inventory_service_client::InventoryServiceClient;
use proto::order::v1::order_service_client::OrderServiceClient;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::Config;

/// A service behind the gateway, named in errors and in the readiness report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Order,
    Inventory,
    Payment,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Order, Service::Inventory, Service::Payment];

    /// The process name, as operators know it.
    pub fn name(self) -> &'static str {
        match self {
            Service::Order => "order-svc",
            Service::Inventory => "inventory-svc",
            Service::Payment => "payment-svc",
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let description = match self {
            Service::Order => "order service",
            Service::Inventory => "inventory service",
            Service::Payment => "payment service",
        };
        write!(f, "{description} ({})", self.name())
    }
}

/// One HTTP/2 channel per service, connected on first use so that the gateway can start
/// before the services, and reconnected after a failure.
#[derive(Clone)]
pub struct Backends {
    order: Channel,
    inventory: Channel,
    payment: Channel,
}

/// What a readiness probe found for one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Serving,
    NotServing,
    Unreachable,
}

impl Backends {
    pub fn connect_lazy(config: &Config) -> anyhow::Result<Backends> {
        // A service that cannot be reached is reported as unavailable, not after the request timeout.
        let connect_timeout = Duration::from_secs(3).min(config.request_timeout());
        let channel = |service: Service, url: &str| -> anyhow::Result<Channel> {
            Ok(Endpoint::from_shared(url.to_owned())
                .with_context(|| format!("invalid URL of {service}: {url}"))?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
                .connect_lazy())
        };
        Ok(Backends {
            order: channel(Service::Order, &config.order_svc_url)?,
            inventory: channel(Service::Inventory, &config.inventory_svc_url)?,
            payment: channel(Service::Payment, &config.payment_svc_url)?,
        })
    }

    pub fn order(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.order.clone())
    }

    pub fn inventory(&self) -> InventoryServiceClient<Channel> {
        InventoryServiceClient::new(self.inventory.clone())
    }

    pub fn payment(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(self.payment.clone())
    }

    fn channel(&self, service: Service) -> Channel {
        match service {
            Service::Order => self.order.clone(),
            Service::Inventory => self.inventory.clone(),
            Service::Payment => self.payment.clone(),
        }
    }

    /// Asks every service the standard gRPC health check (the server as a whole), concurrently.
    pub async fn readiness(&self, timeout: Duration) -> BTreeMap<&'static str, Readiness> {
        let probes = Service::ALL.map(|service| {
            let mut client = HealthClient::new(self.channel(service));
            async move {
                let request = HealthCheckRequest {
                    service: String::new(),
                };
                let readiness = match tokio::time::timeout(timeout, client.check(request)).await {
                    Ok(Ok(response)) if response.get_ref().status() == ServingStatus::Serving => {
                        Readiness::Serving
                    }
                    Ok(Ok(_)) => Readiness::NotServing,
                    Ok(Err(status)) => {
                        let (code, message) = (status.code(), status.message());
                        tracing::debug!(%service, ?code, message, "health check failed");
                        Readiness::Unreachable
                    }
                    Err(_) => {
                        tracing::debug!(%service, ?timeout, "health check timed out");
                        Readiness::Unreachable
                    }
                };
                (service.name(), readiness)
            }
        });
        let [order, inventory, payment] = probes;
        let (order, inventory, payment) = tokio::join!(order, inventory, payment);
        BTreeMap::from([order, inventory, payment])
    }
}
