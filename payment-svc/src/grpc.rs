//! `payment.v1.PaymentService`.

use std::sync::Arc;
use std::time::Duration;

use messaging::{MessageContext, Outbox, OutboxRows};
use proto::payment::v1 as pb;
use proto::payment::v1::payment_service_server::PaymentService;
use proto::topics::SAGA_REPLIES;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::convert;
use crate::error::Error;
use crate::payment::{CustomerId, OrderId, Payment, PaymentId, PaymentStatus};
use crate::provider::{Decision, PaymentProvider};
use crate::store;

/// Longest payment method token accepted (order-svc accepts no longer).
const MAX_PAYMENT_METHOD_CHARS: usize = 255;

/// Payments read at a time by ListPayments.
const LIST_PAGE_SIZE: usize = 1000;

pub struct PaymentGrpc {
    pool: PgPool,
    outbox: Outbox,
    provider: Arc<dyn PaymentProvider>,
    provider_timeout: Duration,
}

impl PaymentGrpc {
    pub fn new(
        pool: PgPool,
        outbox: Outbox,
        provider: Arc<dyn PaymentProvider>,
        provider_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            outbox,
            provider,
            provider_timeout,
        }
    }

    /// Lets the provider decide a payment awaiting verification, and tells the saga.
    ///
    /// The provider is asked outside any transaction, holding no lock, for at most the
    /// provider timeout: first the attempt is recorded with the idempotency key the provider
    /// sees, then its answer is recorded with the reply to the saga in one transaction. A
    /// verification that gets no answer (or a crash before its outcome is recorded) leaves the
    /// attempt; a retried verification and the deadline's void find it and settle the same
    /// attempt, so the money is never taken twice. Concurrent verifications of one payment are
    /// the same attempt: the first outcome recorded wins, and one reply is sent.
    ///
    /// The verification joins the saga's trace: its span is a child of the span that asked for
    /// the payment (stored with it), linked to the client's request, which has a trace of its
    /// own; the reply it sends continues the saga's trace.
    ///
    /// With `customer`, only that customer's payment: the statement that records the attempt
    /// checks it, so another customer's payment is never attempted; it is answered as one that
    /// does not exist, whatever its state.
    async fn verify(
        &self,
        id: PaymentId,
        customer: Option<&CustomerId>,
        request: &MessageContext,
    ) -> Result<Payment, Error> {
        let not_found = || Error::NotFound(format!("payment {id} not found"));
        let payment = store::begin_attempt(&self.pool, id, Uuid::now_v7(), customer)
            .await?
            .ok_or_else(not_found)?;
        if let Some(customer) = customer {
            match &payment.customer_id {
                Some(owner) if owner == customer => {}
                Some(_) => return Err(not_found()),
                None => {
                    return Err(Error::OwnerUnknown(format!(
                        "payment {id} was recorded before payments knew their customer; \
                         check its order's customer, then verify it without customer_id"
                    )))
                }
            }
        }
        let correlation_id = if payment.correlation_id.is_empty() {
            &request.correlation_id
        } else {
            &payment.correlation_id
        };
        let span = tracing::info_span!(
            "payment.verify",
            payment_id = %id,
            order_id = %payment.order_id,
            %correlation_id,
        );
        if telemetry::propagation::set_parent(&span, &payment.traceparent, "") {
            if let Some(request_span) = telemetry::propagation::TraceContext::current()
                .and_then(|current| current.span_context())
            {
                telemetry::propagation::add_link(&span, request_span);
            }
        }
        self.decide(payment, request).instrument(span).await
    }

    async fn decide(&self, payment: Payment, request: &MessageContext) -> Result<Payment, Error> {
        let id = payment.payment_id;
        if payment.status != PaymentStatus::AwaitingVerification {
            return decided(payment);
        }
        let key = payment.attempt_key.ok_or_else(|| {
            Error::Internal(format!("payment {id} awaits verification with no attempt"))
        })?;
        let decision = tokio::time::timeout(
            self.provider_timeout,
            self.provider.verify(&payment, &key.to_string()),
        )
        .await
        .map_err(|_| {
            Error::ProviderTimedOut(format!(
                "the payment provider did not answer within {} ms; verify payment {id} again",
                self.provider_timeout.as_millis()
            ))
        })?;
        let (status, reason) = match &decision {
            Decision::Approved => (PaymentStatus::Succeeded, None),
            Decision::Declined { reason } => (PaymentStatus::Declined, Some(reason.as_str())),
        };
        // The reply is made before the statement that records the answer with it.
        let context = saga_context(&payment, request);
        let order_id = payment.order_id.0;
        let message = match reason {
            None => {
                let reply = pb::PaymentSucceeded {
                    order_id: order_id.to_string(),
                    payment_id: id.to_string(),
                };
                self.outbox
                    .message(SAGA_REPLIES, order_id, &reply, &context)
            }
            Some(reason) => {
                // The payment as that statement leaves it.
                let declined = Payment {
                    status,
                    decline_reason: Some(reason.to_owned()),
                    ..payment.clone()
                };
                let reply = convert::payment_failed(&declined);
                self.outbox
                    .message(SAGA_REPLIES, order_id, &reply, &context)
            }
        };
        let messages = [message];
        let mut conn = self.pool.acquire().await?;
        let settled = store::settle(
            &mut conn,
            id,
            key,
            status,
            reason,
            &OutboxRows::new(&messages)?,
        )
        .await?;
        let Some((updated, earlier)) = settled else {
            // Settled meanwhile: by another try of this attempt, or by the deadline's void,
            // which settles the attempt itself.
            drop(conn);
            let current = store::find(&self.pool, id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("payment {id} not found")))?;
            if current.status == PaymentStatus::AwaitingVerification {
                return Err(Error::Internal(format!(
                    "payment {id} awaits verification, yet its attempt {key} could not be settled"
                )));
            }
            return decided(current);
        };
        self.outbox.recorded(&mut conn).await?;
        self.outbox.committed_messages(messages, earlier);
        tracing::debug!(
            payment_id = %id,
            %order_id,
            status = %updated.status,
            decline_reason = updated.decline_reason.as_deref().unwrap_or(""),
            correlation_id = %context.correlation_id,
            "payment verified"
        );
        Ok(updated)
    }

    async fn get(&self, request: &pb::GetPaymentRequest) -> Result<Payment, Error> {
        match (request.payment_id.is_empty(), request.order_id.is_empty()) {
            (false, true) => {
                let id = PaymentId(convert::uuid("payment_id", &request.payment_id)?);
                store::find(&self.pool, id)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("payment {id} not found")))
            }
            (true, false) => {
                let id = OrderId(convert::uuid("order_id", &request.order_id)?);
                store::find_by_order(&self.pool, id)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("order {id} has no payment")))
            }
            _ => Err(Error::Invalid(
                "exactly one of payment_id or order_id must be set".to_owned(),
            )),
        }
    }
}

/// The answer to a verification of a payment decided before: the same answer, with nothing
/// sent or charged again, or a refusal when the saga has compensated it.
fn decided(payment: Payment) -> Result<Payment, Error> {
    let id = payment.payment_id;
    match payment.status {
        PaymentStatus::Succeeded | PaymentStatus::Declined => Ok(payment),
        PaymentStatus::Voided => Err(Error::Refused(format!(
            "payment {id} was voided: the order's payment deadline passed; no money was taken"
        ))),
        PaymentStatus::Refunded => Err(Error::Refused(format!(
            "payment {id} was refunded: the order could not be completed and the money was given back"
        ))),
        PaymentStatus::AwaitingVerification => Err(Error::Internal(format!(
            "payment {id} awaits verification"
        ))),
    }
}

/// The context of a reply caused by a request: the saga's correlation id and trace context,
/// stored with the payment, so the reply belongs to the saga's trace; the request's when the
/// payment has none. The request itself is the cause.
fn saga_context(payment: &Payment, request: &MessageContext) -> MessageContext {
    let (traceparent, tracestate) = if payment.traceparent.is_empty() {
        (request.traceparent.clone(), request.tracestate.clone())
    } else {
        (payment.traceparent.clone(), String::new())
    };
    MessageContext {
        correlation_id: if payment.correlation_id.is_empty() {
            request.correlation_id.clone()
        } else {
            payment.correlation_id.clone()
        },
        causation_id: Uuid::now_v7().to_string(),
        traceparent,
        tracestate,
    }
}

#[tonic::async_trait]
impl PaymentService for PaymentGrpc {
    type ListPaymentsStream = runtime::grpc::ServerStream<pb::Payment>;

    async fn list_payments(
        &self,
        _request: Request<pb::ListPaymentsRequest>,
    ) -> Result<Response<Self::ListPaymentsStream>, Status> {
        Ok(Response::new(runtime::grpc::table_stream(
            crate::SERVICE,
            self.pool.clone(),
            LIST_PAGE_SIZE,
            |pool, after, limit| async move { store::list_page(&pool, after, limit).await },
            |p| (p.order_id, convert::payment(&p)),
        )))
    }

    async fn verify_payment(
        &self,
        request: Request<pb::VerifyPaymentRequest>,
    ) -> Result<Response<pb::VerifyPaymentResponse>, Status> {
        let context = messaging::service::request_context(request.metadata());
        let id = PaymentId(convert::uuid("payment_id", &request.get_ref().payment_id)?);
        // No order can have such a customer, so no payment is theirs: the answer to another
        // customer's payment.
        let customer = CustomerId::parse(&request.get_ref().customer_id)
            .map_err(|_| Error::NotFound(format!("payment {id} not found")))?;
        let payment = self.verify(id, customer.as_ref(), &context).await?;
        Ok(Response::new(pb::VerifyPaymentResponse {
            payment: Some(convert::payment(&payment)),
        }))
    }

    async fn verify_customer_payment(
        &self,
        request: Request<pb::VerifyPaymentRequest>,
    ) -> Result<Response<pb::VerifyPaymentResponse>, Status> {
        if request.get_ref().customer_id.is_empty() {
            return Err(Error::Invalid("customer_id is required".to_owned()).into());
        }
        self.verify_payment(request).await
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::Payment>, Status> {
        let payment = self.get(request.get_ref()).await?;
        Ok(Response::new(convert::payment(&payment)))
    }

    async fn validate_payment_method(
        &self,
        request: Request<pb::ValidatePaymentMethodRequest>,
    ) -> Result<Response<pb::ValidatePaymentMethodResponse>, Status> {
        let method = request.into_inner().payment_method;
        if method.is_empty() {
            return Err(Error::Invalid("payment_method is required".to_owned()).into());
        }
        runtime::text::identifier(&method, MAX_PAYMENT_METHOD_CHARS)
            .map_err(|problem| Status::from(Error::Invalid(format!("payment_method {problem}"))))?;
        self.provider
            .check_method(&method)
            .map_err(|message| Status::from(Error::Invalid(message)))?;
        Ok(Response::new(pb::ValidatePaymentMethodResponse {
            payment_method: method,
        }))
    }
}
