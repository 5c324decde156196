//! The operators' gRPC API, `saga.v1.SagaAdmin`: list and read sagas with their history, send
//! a stuck step's command again, or compensate now. Served on its own address and only with
//! the admin token ([`auth`]).

pub mod auth;
pub mod convert;
pub mod error;

use std::time::Duration;

use messaging::HandlerError;
use proto::saga::v1 as pb;
use proto::saga::v1::saga_admin_server::{SagaAdmin, SagaAdminServer};
use sqlx::{PgConnection, PgPool};
use tonic::codegen::InterceptedService;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::engine::{Engine, Trigger};
use crate::saga::{Input, SagaState};
use crate::store::{self, admin as queries};
use auth::BearerToken;
use error::Error;

/// `message_type` of the history rows an operator's request causes.
pub const RETRY_MESSAGE_TYPE: &str = "operator.RetrySaga";
pub const ABORT_MESSAGE_TYPE: &str = "operator.AbortSaga";

const DEFAULT_PAGE_SIZE: u32 = 50;
const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_STUCK_AFTER_SECS: u64 = 300;
/// Ages beyond a century are surely a mistake (and would overflow an interval).
const MAX_AGE_SECS: u64 = 100 * 365 * 86_400;
const MAX_REASON_CHARS: usize = 500;
const MAX_REQUEST_ID_CHARS: usize = 128;
/// Times a request is applied again when the saga changed under it (a reply arriving at the
/// same moment), before giving up with ABORTED.
const CONFLICT_ATTEMPTS: u32 = 5;

/// The admin API as served: the service behind the token check.
pub type AdminServer = InterceptedService<SagaAdminServer<SagaAdminApi>, BearerToken>;

/// The admin API, accepting only requests that carry `token`.
pub fn server(pool: PgPool, engine: Engine, token: &str) -> AdminServer {
    SagaAdminServer::with_interceptor(SagaAdminApi { pool, engine }, BearerToken::new(token))
}

#[derive(Clone)]
pub struct SagaAdminApi {
    pool: PgPool,
    engine: Engine,
}

/// Why an operator's request was not applied by one attempt.
enum Unapplied {
    /// The saga's state refuses the input.
    Refused(&'static str),
    /// The step failed: a concurrent change (transient, tried again) or unreadable data.
    Step(HandlerError),
    Failed(Error),
}

/// An operator's request to step a saga.
struct Operation<'a> {
    saga_id: Uuid,
    input: Input,
    message_type: &'static str,
    reason: Option<String>,
    request_id: Option<String>,
    metadata: &'a MetadataMap,
}

/// The failure reason the state machine gives a saga aborted with `reason`.
fn abort_failure_reason(reason: &str) -> String {
    format!("aborted by an operator: {reason}")
}

fn optional_text(field: &str, value: &str, max: usize) -> Result<Option<String>, Error> {
    let value = value.trim();
    if value.chars().count() > max {
        return Err(Error::Invalid(format!(
            "{field} must be at most {max} characters"
        )));
    }
    Ok((!value.is_empty()).then(|| value.to_owned()))
}

fn age(field: &str, secs: u64) -> Result<Option<i64>, Error> {
    match secs {
        0 => Ok(None),
        s if s <= MAX_AGE_SECS => Ok(Some(s as i64)),
        s => Err(Error::Invalid(format!(
            "{field} must be at most {MAX_AGE_SECS}, got {s}"
        ))),
    }
}

fn filter(request: &pb::ListSagasRequest) -> Result<queries::Filter, Error> {
    let mut states = request
        .states
        .iter()
        .map(|s| convert::state_filter(*s))
        .collect::<Result<Vec<_>, _>>()?;
    states.dedup();
    let stuck_after_secs = if request.stuck_only {
        Some(
            age("stuck_after_seconds", request.stuck_after_seconds)?
                .unwrap_or(DEFAULT_STUCK_AFTER_SECS as i64),
        )
    } else {
        None
    };
    Ok(queries::Filter {
        states,
        needs_operator: request.needs_operator,
        customer_id: optional_text("customer_id", &request.customer_id, 128)?,
        saga_id: match request.order_id.trim() {
            "" => None,
            id => Some(convert::saga_id("order_id", id)?),
        },
        older_than_secs: age("older_than_seconds", request.older_than_seconds)?,
        newer_than_secs: age("newer_than_seconds", request.newer_than_seconds)?,
        stuck_after_secs,
    })
}

impl SagaAdminApi {
    async fn list(&self, request: pb::ListSagasRequest) -> Result<pb::ListSagasResponse, Error> {
        let filter = filter(&request)?;
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            n => {
                return Err(Error::Invalid(format!(
                    "page_size must be at most {MAX_PAGE_SIZE}, got {n}"
                )))
            }
        } as usize;
        let after = match request.page_token.trim() {
            "" => None,
            token => Some(convert::cursor(token)?),
        };
        let mut conn = self.pool.acquire().await?;
        // One more than a page tells whether there is a next one.
        let mut records = queries::list(&mut conn, &filter, after, page_size as i64 + 1).await?;
        let next_page_token = if records.len() > page_size {
            records.truncate(page_size);
            records
                .last()
                .map(|r| convert::page_token(r.cursor()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListSagasResponse {
            sagas: records.into_iter().map(convert::saga).collect(),
            next_page_token,
        })
    }

    async fn detail(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
    ) -> Result<pb::SagaDetail, Error> {
        let record = queries::get(conn, saga_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no saga {saga_id}")))?;
        let history = queries::history(conn, saga_id).await?;
        Ok(pb::SagaDetail {
            saga: Some(convert::saga(record)),
            history: history.into_iter().map(convert::transition).collect(),
        })
    }

    async fn get(&self, request: pb::GetSagaRequest) -> Result<pb::SagaDetail, Error> {
        let saga_id = convert::saga_id("saga_id", &request.saga_id)?;
        let mut conn = self.pool.acquire().await?;
        self.detail(&mut conn, saga_id).await
    }

    /// Applies an operator's input in one transaction, as a message would be: the transition,
    /// its history row and its commands in the outbox commit together.
    async fn operate(&self, operation: Operation<'_>) -> Result<pb::SagaDetail, Error> {
        let saga_id = operation.saga_id;
        let message_id = format!(
            "admin:{}",
            operation
                .request_id
                .clone()
                .unwrap_or_else(|| Uuid::now_v7().to_string())
        );
        // The request's correlation id (the saga keeps its own for the messages it sends) and
        // trace context; its commands are caused by the operator's request.
        let mut context = messaging::service::request_context(operation.metadata);
        context.causation_id = message_id.clone();
        let mut last_conflict = String::new();
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let mut tx = self.pool.begin().await?;
            let stored = store::load(&mut tx, saga_id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("no saga {saga_id}")))?;
            if operation.request_id.is_some()
                && queries::has_caused(&mut tx, saga_id, &message_id).await?
            {
                // The same request again: it was applied once, answer the saga as it is.
                return self.detail(&mut tx, saga_id).await;
            }
            if let Input::Abort { reason } = &operation.input {
                let already = matches!(
                    stored.saga.state,
                    SagaState::Compensating | SagaState::Failing | SagaState::Failed
                ) && stored.saga.failure_reason.as_deref()
                    == Some(abort_failure_reason(reason).as_str());
                if already {
                    return self.detail(&mut tx, saga_id).await;
                }
            }
            if context.correlation_id.is_empty() {
                context.correlation_id = stored.correlation_id.clone();
            }
            let trigger = Trigger {
                message_id: message_id.clone(),
                message_type: operation.message_type.to_owned(),
                context: Some(context.clone()),
            };
            // The step's metrics are recorded once its transaction commits, never for an
            // attempt rolled back (and retried).
            let applied = messaging::after_commit::scope(async {
                let saga = match self
                    .engine
                    .try_step(&mut tx, saga_id, &operation.input, &trigger)
                    .await
                {
                    Ok(Ok(saga)) => saga,
                    Ok(Err(why)) => return Err(Unapplied::Refused(why)),
                    Err(e) => return Err(Unapplied::Step(e)),
                };
                if let Some(reason) = &operation.reason {
                    queries::set_operator_reason(&mut tx, saga_id, &message_id, reason)
                        .await
                        .map_err(|e| Unapplied::Failed(e.into()))?;
                }
                let detail = self
                    .detail(&mut tx, saga_id)
                    .await
                    .map_err(Unapplied::Failed)?;
                tx.commit().await.map_err(|e| Unapplied::Failed(e.into()))?;
                Ok((saga, detail))
            })
            .await;
            match applied {
                Ok((saga, detail)) => {
                    self.engine.committed();
                    tracing::info!(
                        %saga_id,
                        input = operation.input.name(),
                        state = saga.state.as_str(),
                        reason = operation.reason.as_deref().unwrap_or(""),
                        %message_id,
                        correlation_id = %stored.correlation_id,
                        "operator request applied"
                    );
                    return Ok(detail);
                }
                Err(Unapplied::Refused(why)) => {
                    let failing = match (&stored.saga.failure_reason, stored.saga.state) {
                        (
                            Some(reason),
                            SagaState::Compensating | SagaState::Failing | SagaState::Failed,
                        ) => {
                            format!(" ({reason})")
                        }
                        _ => String::new(),
                    };
                    return Err(Error::Refused(format!(
                        "saga {saga_id} is {}{failing}: {why}",
                        stored.saga.state
                    )));
                }
                Err(Unapplied::Step(HandlerError::Transient(e))) => {
                    last_conflict = e;
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                }
                Err(Unapplied::Step(HandlerError::Permanent(e))) => return Err(Error::Corrupt(e)),
                Err(Unapplied::Failed(e)) => return Err(e),
            }
        }
        Err(Error::Conflict(format!(
            "saga {saga_id} kept changing while the request was applied ({last_conflict}); try again"
        )))
    }

    async fn retry(
        &self,
        request: pb::RetrySagaRequest,
        metadata: &MetadataMap,
    ) -> Result<pb::SagaDetail, Error> {
        self.operate(Operation {
            saga_id: convert::saga_id("saga_id", &request.saga_id)?,
            input: Input::Retry,
            message_type: RETRY_MESSAGE_TYPE,
            reason: optional_text("reason", &request.reason, MAX_REASON_CHARS)?,
            request_id: optional_text("request_id", &request.request_id, MAX_REQUEST_ID_CHARS)?,
            metadata,
        })
        .await
    }

    async fn abort(
        &self,
        request: pb::AbortSagaRequest,
        metadata: &MetadataMap,
    ) -> Result<pb::SagaDetail, Error> {
        let saga_id = convert::saga_id("saga_id", &request.saga_id)?;
        let reason = optional_text("reason", &request.reason, MAX_REASON_CHARS)?
            .ok_or_else(|| Error::Invalid("reason is required to abort a saga".to_owned()))?;
        self.operate(Operation {
            saga_id,
            input: Input::Abort {
                reason: reason.clone(),
            },
            message_type: ABORT_MESSAGE_TYPE,
            reason: Some(reason),
            request_id: optional_text("request_id", &request.request_id, MAX_REQUEST_ID_CHARS)?,
            metadata,
        })
        .await
    }
}

/// The answer, with the saga's correlation id in the metadata.
fn with_correlation_id(detail: pb::SagaDetail) -> Response<pb::SagaDetail> {
    let correlation_id = detail
        .saga
        .as_ref()
        .map(|s| s.correlation_id.clone())
        .unwrap_or_default();
    let mut response = Response::new(detail);
    if let Ok(value) = MetadataValue::try_from(correlation_id.as_str()) {
        if !correlation_id.is_empty() {
            response
                .metadata_mut()
                .insert(convert::CORRELATION_ID, value);
        }
    }
    response
}

#[tonic::async_trait]
impl SagaAdmin for SagaAdminApi {
    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::SagaDetail>, Status> {
        Ok(with_correlation_id(self.get(request.into_inner()).await?))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::SagaDetail>, Status> {
        let (metadata, _, request) = request.into_parts();
        Ok(with_correlation_id(self.retry(request, &metadata).await?))
    }

    async fn abort_saga(
        &self,
        request: Request<pb::AbortSagaRequest>,
    ) -> Result<Response<pb::SagaDetail>, Status> {
        let (metadata, _, request) = request.into_parts();
        Ok(with_correlation_id(self.abort(request, &metadata).await?))
    }
}
