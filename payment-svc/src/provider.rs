//! Who decides whether a payment goes through. Pluggable; the built-in [`Simulator`] decides
//! by the payment method token, as payment providers' test cards do, so that every path of the
//! saga can be triggered on purpose.

use async_trait::async_trait;

use crate::payment::Payment;

/// A provider's answer to a verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Approved,
    Declined { reason: String },
}

#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Whether the provider accepts this payment method at all; the error says why not, and
    /// which methods it accepts.
    fn check_method(&self, method: &str) -> Result<(), String>;

    /// Takes the money, or says why not. `idempotency_key` names the attempt: asked again with
    /// the same key (a retried verification, a void settling an attempt whose answer was
    /// lost), a provider answers as the first time and charges nothing more, as payment
    /// providers' idempotency keys do. The caller bounds how long it waits.
    async fn verify(&self, payment: &Payment, idempotency_key: &str) -> Decision;
}

/// Test tokens the simulator approves.
pub const APPROVED_TOKENS: &[&str] = &["pm_card_visa", "pm_card_mastercard", "pm_card_amex"];

/// Test tokens the simulator declines, with the reason it gives.
pub const DECLINED_TOKENS: &[(&str, &str)] = &[
    ("pm_card_chargeDeclined", "card_declined"),
    (
        "pm_card_chargeDeclinedInsufficientFunds",
        "insufficient_funds",
    ),
    ("pm_card_chargeDeclinedExpiredCard", "expired_card"),
    ("pm_card_chargeDeclinedFraudulent", "fraudulent"),
];

/// The built-in provider: the outcome is chosen by the payment method token.
#[derive(Clone, Copy, Debug, Default)]
pub struct Simulator;

impl Simulator {
    fn decide(method: &str) -> Result<Decision, String> {
        if APPROVED_TOKENS.contains(&method) {
            return Ok(Decision::Approved);
        }
        if let Some((_, reason)) = DECLINED_TOKENS.iter().find(|(token, _)| *token == method) {
            return Ok(Decision::Declined {
                reason: (*reason).to_owned(),
            });
        }
        let accepted: Vec<&str> = APPROVED_TOKENS
            .iter()
            .copied()
            .chain(DECLINED_TOKENS.iter().map(|(token, _)| *token))
            .collect();
        Err(format!(
            "unsupported payment_method {method:?}: the payment simulator accepts {}",
            accepted.join(", ")
        ))
    }
}

#[async_trait]
impl PaymentProvider for Simulator {
    fn check_method(&self, method: &str) -> Result<(), String> {
        Self::decide(method).map(|_| ())
    }

    async fn verify(&self, payment: &Payment, _idempotency_key: &str) -> Decision {
        // The outcome depends on the method alone, so every try of an attempt answers alike.
        // A method refused up front never reaches verification; decline it all the same.
        Self::decide(&payment.payment_method).unwrap_or_else(|reason| Decision::Declined { reason })
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use uuid::Uuid;

    use super::*;
    use crate::payment::{OrderId, PaymentId, PaymentStatus};

    fn payment(method: &str) -> Payment {
        Payment {
            payment_id: PaymentId(Uuid::new_v4()),
            order_id: OrderId(Uuid::new_v4()),
            amount_cents: 1999,
            currency: "USD".into(),
            payment_method: method.into(),
            status: PaymentStatus::AwaitingVerification,
            decline_reason: None,
            correlation_id: String::new(),
            traceparent: String::new(),
            customer_id: None,
            tombstone: false,
            attempt_key: None,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn approves_the_success_cards() {
        for token in ["pm_card_visa", "pm_card_mastercard", "pm_card_amex"] {
            assert_eq!(Simulator.check_method(token), Ok(()));
            assert_eq!(
                Simulator.verify(&payment(token), "key").await,
                Decision::Approved
            );
        }
    }

    #[tokio::test]
    async fn declines_the_decline_cards_with_their_reason() {
        for (token, reason) in [
            ("pm_card_chargeDeclined", "card_declined"),
            (
                "pm_card_chargeDeclinedInsufficientFunds",
                "insufficient_funds",
            ),
            ("pm_card_chargeDeclinedExpiredCard", "expired_card"),
            ("pm_card_chargeDeclinedFraudulent", "fraudulent"),
        ] {
            assert_eq!(
                Simulator.check_method(token),
                Ok(()),
                "{token} is a valid method"
            );
            assert_eq!(
                Simulator.verify(&payment(token), "key").await,
                Decision::Declined {
                    reason: reason.to_owned()
                }
            );
        }
    }

    #[tokio::test]
    async fn refuses_unknown_tokens_listing_the_accepted_ones() {
        for token in ["", "pm_card_unknown", "PM_CARD_VISA", "4242424242424242"] {
            let message = Simulator.check_method(token).unwrap_err();
            assert!(message.contains("unsupported payment_method"), "{message}");
            for accepted in APPROVED_TOKENS
                .iter()
                .chain(DECLINED_TOKENS.iter().map(|(t, _)| t))
            {
                assert!(message.contains(accepted), "{message} lists {accepted}");
            }
            assert!(matches!(
                Simulator.verify(&payment(token), "key").await,
                Decision::Declined { .. }
            ));
        }
    }
}
