//! `POST /payment/verify`: of the customer's own orders only, checked by payment-svc in the
//! one `VerifyPayment` call (by the order, for payments charged before it knew customers).

use axum::extract::State;
use axum::Json;
use proto::order::v1::GetOrderRequest;
use proto::payment::v1::{
    GetPaymentRequest, VerifyPaymentRequest, OWNER_UNKNOWN_KEY, OWNER_UNKNOWN_VALUE,
};

use super::AppState;
use crate::backends::Service;
use crate::correlation::RequestContext;
use crate::error::{ApiError, ErrorDocument};
use crate::identity::CustomerId;
use crate::json::{ApiJson, PaymentJson, VerifyPaymentBody};

/// Verify a payment of one of the customer's orders: the provider decides.
///
/// The provider's outcome, declined included, is a 200 (verifying again answers the same
/// outcome and charges nothing more); a payment that can no longer be verified (voided after
/// the order's deadline) is a 409.
#[utoipa::path(
    post,
    path = "/payment/verify",
    tag = "payments",
    operation_id = "verifyPayment",
    security(("customer" = [])),
    request_body = VerifyPaymentBody,
    responses(
        (status = 200, description = "The provider's outcome.", body = PaymentJson),
        (status = 400, description = "Malformed JSON.", body = ErrorDocument),
        (status = 404, description = "No such payment of this customer's orders.", body = ErrorDocument),
        (status = 409, description = "The payment can no longer be verified.", body = ErrorDocument),
        (status = 413, description = "The body is larger than 64 KiB.", body = ErrorDocument),
        (status = 415, description = "The body is not `application/json`.", body = ErrorDocument),
        (status = 422, description = "Invalid fields.", body = ErrorDocument),
    )
)]
pub(super) async fn verify(
    State(state): State<AppState>,
    customer: CustomerId,
    context: RequestContext,
    ApiJson(body): ApiJson<VerifyPaymentBody>,
) -> Result<Json<PaymentJson>, ApiError> {
    let payment_id = uuid::Uuid::parse_str(&body.payment_id)
        .map_err(|_| ApiError::Invalid(format!("payment_id `{}` is not a UUID", body.payment_id)))?
        .to_string();
    // Another customer's payment is answered word for word as one that does not exist.
    let not_found = || ApiError::NotFound(format!("payment {payment_id} not found"));
    let mut payments = state.backends.payment();
    // One call: payment-svc checks the customer in the statement that starts the verification.
    let reply = match payments
        .verify_customer_payment(context.grpc(VerifyPaymentRequest {
            payment_id: payment_id.clone(),
            customer_id: customer.0.clone(),
        }))
        .await
    {
        Err(status) if owner_unknown(&status) || status.code() == tonic::Code::Unimplemented => {
            // A payment charged before payment-svc knew customers, or a payment-svc older than
            // VerifyCustomerPayment: the payment's order tells whose it is.
            check_owner_by_order(&state, &context, &payment_id, customer, not_found).await?;
            payments
                .verify_payment(context.grpc(VerifyPaymentRequest {
                    payment_id: payment_id.clone(),
                    customer_id: String::new(),
                }))
                .await
        }
        answer => answer,
    }
    .map_err(|status| match status.code() {
        tonic::Code::NotFound => not_found(),
        _ => ApiError::from_grpc(Service::Payment, status),
    })?
    .into_inner();
    let payment = reply.payment.ok_or_else(|| {
        ApiError::invalid_reply(Service::Payment, "VerifyPayment replied without a payment")
    })?;
    let payment = PaymentJson::try_from(payment)
        .map_err(|problem| ApiError::invalid_reply(Service::Payment, problem))?;
    Ok(Json(payment))
}

/// Whether payment-svc could not check the customer of the payment (one recorded before it
/// knew customers), rather than refused it.
fn owner_unknown(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status
            .metadata()
            .get(OWNER_UNKNOWN_KEY)
            .is_some_and(|value| value == OWNER_UNKNOWN_VALUE)
}

/// The check of a payment's customer before payment-svc knew customers: the payment's order
/// must be the customer's (`GetPayment`, then `GetOrder` with the customer).
async fn check_owner_by_order(
    state: &AppState,
    context: &RequestContext,
    payment_id: &str,
    customer: CustomerId,
    not_found: impl Fn() -> ApiError,
) -> Result<(), ApiError> {
    let payment = state
        .backends
        .payment()
        .get_payment(context.grpc(GetPaymentRequest {
            payment_id: payment_id.to_owned(),
            order_id: String::new(),
        }))
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => not_found(),
            _ => ApiError::from_grpc(Service::Payment, status),
        })?
        .into_inner();
    state
        .backends
        .order()
        .get_order(context.grpc(GetOrderRequest {
            order_id: payment.order_id,
            customer_id: customer.0,
            ..Default::default()
        }))
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => not_found(),
            _ => ApiError::from_grpc(Service::Order, status),
        })?;
    Ok(())
}
