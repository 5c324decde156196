//! Generated protobuf code, one module per versioned package, and the Kafka topic names.
//!
//! Only contracts live here; each service converts to its own domain types at its edge.

pub mod messaging {
    pub mod v1 {
        tonic::include_proto!("messaging.v1");
    }
}

pub mod order {
    pub mod v1 {
        tonic::include_proto!("order.v1");
    }
}

pub mod inventory {
    pub mod v1 {
        tonic::include_proto!("inventory.v1");
    }
}

pub mod payment {
    pub mod v1 {
        tonic::include_proto!("payment.v1");

        /// The metadata key of `VerifyPayment`'s FAILED_PRECONDITION, with the value
        /// [`OWNER_UNKNOWN_VALUE`], when it was asked to check the customer of a payment
        /// recorded before payments knew their customer: the caller checks the order's
        /// customer itself, then verifies without `customer_id`. Any other
        /// FAILED_PRECONDITION (a voided or refunded payment) is a refusal.
        pub const OWNER_UNKNOWN_KEY: &str = "payment-owner";
        /// See [`OWNER_UNKNOWN_KEY`].
        pub const OWNER_UNKNOWN_VALUE: &str = "unknown";
    }
}

/// The orchestrator's operators' API (`SagaAdmin`).
pub mod saga {
    pub mod v1 {
        tonic::include_proto!("saga.v1");
    }
}

/// Encoded `FileDescriptorSet` of every package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

/// Kafka topics (before a deployment's prefix is applied). Every message is keyed by order id.
pub mod topics {
    /// `order.v1.OrderCreated`, from order-svc to the orchestrator.
    pub const ORDER_EVENTS: &str = "order.events";
    /// Commands from the orchestrator to order-svc.
    pub const ORDER_COMMANDS: &str = "order.commands";
    /// Commands from the orchestrator to inventory-svc.
    pub const INVENTORY_COMMANDS: &str = "inventory.commands";
    /// Commands from the orchestrator to payment-svc.
    pub const PAYMENT_COMMANDS: &str = "payment.commands";
    /// Replies of inventory-svc and payment-svc to the orchestrator.
    pub const SAGA_REPLIES: &str = "saga.replies";

    pub const ALL: &[&str] = &[
        ORDER_EVENTS,
        ORDER_COMMANDS,
        INVENTORY_COMMANDS,
        PAYMENT_COMMANDS,
        SAGA_REPLIES,
    ];

    /// The dead-letter topic of `topic`.
    pub fn dead_letter(topic: &str) -> String {
        format!("{topic}.dlq")
    }
}
