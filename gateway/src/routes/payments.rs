//! `POST /payment/verify`.

use axum::extract::State;
use axum::Json;
use proto::payment::v1::VerifyPaymentRequest;

use super::AppState;
use crate::backends::Service;
use crate::correlation::RequestContext;
use crate::error::ApiError;
use crate::json::{ApiJson, PaymentJson, VerifyPaymentBody};

/// The provider's outcome, declined included, is a 200; a payment that can no longer be
/// verified (voided) is refused by the payment service with FAILED_PRECONDITION: 409.
pub(super) async fn verify(
    State(state): State<AppState>,
    context: RequestContext,
    ApiJson(body): ApiJson<VerifyPaymentBody>,
) -> Result<Json<PaymentJson>, ApiError> {
    let request = VerifyPaymentRequest {
        payment_id: body.payment_id,
    };
    let reply = state
        .backends
        .payment()
        .verify_payment(context.grpc(request))
        .await
        .map_err(|status| ApiError::from_grpc(Service::Payment, status))?
        .into_inner();
    let payment = reply.payment.ok_or_else(|| {
        ApiError::invalid_reply(Service::Payment, "VerifyPayment replied without a payment")
    })?;
    let payment = PaymentJson::try_from(payment)
        .map_err(|problem| ApiError::invalid_reply(Service::Payment, problem))?;
    Ok(Json(payment))
}
