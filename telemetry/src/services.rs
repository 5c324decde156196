//! The platform's services, named once: the name each gives [`crate::init`] and the port it
//! serves `/metrics` on unless `METRICS_ADDR` says otherwise. The local runner, the load
//! generator and the end-to-end tests read this table rather than keep copies of it.

/// One service of the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Its binary's name, and the name it gives [`crate::init`].
    pub name: &'static str,
    /// Where it serves `/metrics` by default: each service has a port of its own, so that
    /// they run side by side on one machine.
    pub metrics_port: u16,
}

/// Every service, in start-up order: each after the services it calls.
pub const SERVICES: [Service; 5] = [
    Service {
        name: "payment-svc",
        metrics_port: 9103,
    },
    Service {
        name: "inventory-svc",
        metrics_port: 9102,
    },
    Service {
        name: "order-svc",
        metrics_port: 9101,
    },
    Service {
        name: "orchestrator",
        metrics_port: 9104,
    },
    Service {
        name: "gateway",
        metrics_port: 9100,
    },
];

/// The names of [`SERVICES`], in the same order.
pub const NAMES: [&str; SERVICES.len()] = {
    let mut names = [""; SERVICES.len()];
    let mut i = 0;
    while i < SERVICES.len() {
        names[i] = SERVICES[i].name;
        i += 1;
    }
    names
};

/// The service called `name`, if the platform has one.
pub fn named(name: &str) -> Option<Service> {
    SERVICES.into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_a_name_and_a_metrics_port_of_its_own() {
        let mut names = NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SERVICES.len());
        let mut ports: Vec<u16> = SERVICES.iter().map(|s| s.metrics_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), SERVICES.len());
        assert!(!ports.contains(&0));
        assert_eq!(named("orchestrator").map(|s| s.metrics_port), Some(9104));
        assert_eq!(named("kafka"), None);
    }
}
