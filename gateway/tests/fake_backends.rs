//! The gateway against small in-process fakes of the three services: what it sends them
//! (fields, idempotency key, correlation id and trace context as metadata) and how it turns
//! their answers into REST responses.

mod common;

use std::sync::{Arc, Mutex};

use common::{error_body, Gateway};
use proto::inventory::v1::inventory_service_server::{InventoryService, InventoryServiceServer};
use proto::inventory::v1::{
    GetReservationRequest, GetStockRequest, GetStockResponse, Reservation, SetStockRequest,
    StockLevel,
};
use proto::order::v1::order_service_server::{OrderService, OrderServiceServer};
use proto::order::v1::{
    CreateOrderRequest, CreateOrderResponse, GetOrderRequest, ListProductsRequest,
    ListProductsResponse, Order, OrderStatus, PricedLine, Product,
};
use proto::payment::v1::payment_service_server::{PaymentService, PaymentServiceServer};
use proto::payment::v1::{
    GetPaymentRequest, Payment, PaymentStatus, ValidatePaymentMethodRequest,
    ValidatePaymentMethodResponse, VerifyPaymentRequest, VerifyPaymentResponse,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const ORDER_ID: &str = "0190f3f0-0000-7000-8000-000000000001";
/// A payment id the fake payment service does not know.
const UNKNOWN_PAYMENT: &str = "0190f3f0-0000-7000-8000-0000000000ff";
/// A payment the fake payment service cannot tell the customer of (charged before it knew
/// customers): the gateway checks its order instead.
const OWNER_UNKNOWN_PAYMENT: &str = "0190f3f0-0000-7000-8000-0000000000a5";
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// The metadata and request of every call a fake received.
#[derive(Clone, Debug)]
struct Seen {
    correlation_id: Option<String>,
    traceparent: Option<String>,
    request: String,
}

#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<Seen>>>);

impl Calls {
    fn record<T: std::fmt::Debug>(&self, request: &Request<T>) {
        self.record_as("", request)
    }

    /// Records the request as `rpc` (for messages several RPCs take), e.g. `Rpc Message {..}`.
    fn record_as<T: std::fmt::Debug>(&self, rpc: &str, request: &Request<T>) {
        let get = |key| {
            request
                .metadata()
                .get(key)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.0.lock().unwrap().push(Seen {
            correlation_id: get("x-correlation-id"),
            traceparent: get("traceparent"),
            request: format!(
                "{rpc}{}{:?}",
                if rpc.is_empty() { "" } else { " " },
                request.get_ref()
            ),
        });
    }

    fn last(&self) -> Seen {
        self.0.lock().unwrap().last().cloned().expect("a call")
    }
}

fn order(status: OrderStatus) -> Order {
    Order {
        order_id: ORDER_ID.into(),
        customer_id: "cust-1".into(),
        status: status.into(),
        lines: vec![PricedLine {
            sku: "SKU-1".into(),
            quantity: 2,
            unit_price_cents: 1250,
            line_total_cents: 2500,
        }],
        total_cents: 2500,
        currency: "USD".into(),
        payment_method: "pm_card_visa".into(),
        payment_id: String::new(),
        failure_reason: String::new(),
        correlation_id: String::new(),
        created_at_ms: 1_700_000_000_000,
        updated_at_ms: 1_700_000_000_000,
    }
}

struct FakeOrders(Calls);

#[tonic::async_trait]
impl OrderService for FakeOrders {
    type ListOrdersStream = tonic::codegen::BoxStream<Order>;

    async fn list_orders(
        &self,
        _: Request<proto::order::v1::ListOrdersRequest>,
    ) -> Result<Response<Self::ListOrdersStream>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn list_customer_orders(
        &self,
        request: Request<proto::order::v1::ListCustomerOrdersRequest>,
    ) -> Result<Response<proto::order::v1::ListCustomerOrdersResponse>, Status> {
        self.0.record(&request);
        Ok(Response::new(
            proto::order::v1::ListCustomerOrdersResponse {
                orders: vec![order(OrderStatus::Pending)],
                next_page_token: "next".into(),
            },
        ))
    }

    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        self.0.record(&request);
        let request = request.into_inner();
        if request.items.is_empty() {
            return Err(Status::invalid_argument(
                "items: at least one item is required",
            ));
        }
        let replayed = request.idempotency_key == "seen-before";
        Ok(Response::new(CreateOrderResponse {
            order: Some(order(OrderStatus::Pending)),
            replayed,
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        self.0.record(&request);
        let customer = &request.get_ref().customer_id;
        if request.get_ref().order_id != ORDER_ID || (!customer.is_empty() && customer != "cust-1")
        {
            return Err(Status::not_found(format!(
                "no order {}",
                request.get_ref().order_id
            )));
        }
        let failed = Order {
            payment_id: "pay-1".into(),
            failure_reason: "payment declined: card_declined".into(),
            ..order(OrderStatus::Failed)
        };
        Ok(Response::new(failed))
    }

    async fn list_products(
        &self,
        request: Request<ListProductsRequest>,
    ) -> Result<Response<ListProductsResponse>, Status> {
        self.0.record(&request);
        let product = |sku: &str, price| Product {
            sku: sku.into(),
            name: format!("Product {sku}"),
            unit_price_cents: price,
            currency: "USD".into(),
        };
        Ok(Response::new(ListProductsResponse {
            products: vec![product("SKU-1", 1250), product("SKU-2", 999)],
        }))
    }
}

struct FakeInventory(Calls);

#[tonic::async_trait]
impl InventoryService for FakeInventory {
    type ListReservationsStream = tonic::codegen::BoxStream<Reservation>;

    async fn list_reservations(
        &self,
        _: Request<proto::inventory::v1::ListReservationsRequest>,
    ) -> Result<Response<Self::ListReservationsStream>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn get_stock(
        &self,
        request: Request<GetStockRequest>,
    ) -> Result<Response<GetStockResponse>, Status> {
        self.0.record(&request);
        let level = StockLevel {
            sku: "SKU-1".into(),
            available: 7,
            reserved: 1,
            committed: 2,
            ..Default::default()
        };
        Ok(Response::new(GetStockResponse {
            levels: vec![level],
        }))
    }

    async fn set_stock(&self, _: Request<SetStockRequest>) -> Result<Response<StockLevel>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn write_off_stock(
        &self,
        _: Request<proto::inventory::v1::WriteOffStockRequest>,
    ) -> Result<Response<proto::inventory::v1::WriteOffStockResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn get_reservation(
        &self,
        _: Request<GetReservationRequest>,
    ) -> Result<Response<Reservation>, Status> {
        Err(Status::unimplemented("not faked"))
    }
}

struct FakePayments {
    calls: Calls,
    /// Stands for a payment-svc older than VerifyCustomerPayment (it answers UNIMPLEMENTED).
    older: bool,
}

#[tonic::async_trait]
impl PaymentService for FakePayments {
    type ListPaymentsStream = tonic::codegen::BoxStream<Payment>;

    async fn list_payments(
        &self,
        _: Request<proto::payment::v1::ListPaymentsRequest>,
    ) -> Result<Response<Self::ListPaymentsStream>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn verify_customer_payment(
        &self,
        request: Request<VerifyPaymentRequest>,
    ) -> Result<Response<VerifyPaymentResponse>, Status> {
        self.calls.record_as("VerifyCustomerPayment", &request);
        if self.older {
            return Err(Status::unimplemented(
                "unknown method VerifyCustomerPayment",
            ));
        }
        verify(request)
    }

    async fn verify_payment(
        &self,
        request: Request<VerifyPaymentRequest>,
    ) -> Result<Response<VerifyPaymentResponse>, Status> {
        self.calls.record_as("VerifyPayment", &request);
        verify(request)
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        self.calls.record(&request);
        let payment_id = request.into_inner().payment_id;
        if payment_id == UNKNOWN_PAYMENT {
            return Err(Status::not_found(format!("payment {payment_id} not found")));
        }
        Ok(Response::new(Payment {
            payment_id,
            order_id: ORDER_ID.into(),
            ..Default::default()
        }))
    }

    async fn validate_payment_method(
        &self,
        _: Request<ValidatePaymentMethodRequest>,
    ) -> Result<Response<ValidatePaymentMethodResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }
}

/// The fake's verification. The payments are cust-1's, checked as payment-svc does.
fn verify(
    request: Request<VerifyPaymentRequest>,
) -> Result<Response<VerifyPaymentResponse>, Status> {
    let VerifyPaymentRequest {
        payment_id,
        customer_id,
    } = request.into_inner();
    // The payments are cust-1's, checked as payment-svc does: another customer's is the
    // answer for one that does not exist; one of an unknown owner asks for the order.
    let not_found = || Status::not_found(format!("payment {payment_id} not found"));
    let owner_unknown = payment_id == OWNER_UNKNOWN_PAYMENT;
    let theirs = !matches!(customer_id.as_str(), "" | "cust-1");
    if payment_id == UNKNOWN_PAYMENT || (theirs && !owner_unknown) {
        return Err(not_found());
    }
    if owner_unknown && !customer_id.is_empty() {
        let mut status =
            Status::failed_precondition("recorded before payments knew their customer");
        status.metadata_mut().insert(
            proto::payment::v1::OWNER_UNKNOWN_KEY,
            proto::payment::v1::OWNER_UNKNOWN_VALUE.parse().unwrap(),
        );
        return Err(status);
    }
    let (status, decline_reason) = match payment_id.as_str() {
        "0190f3f0-0000-7000-8000-0000000000a2" => (PaymentStatus::Declined, "card_declined"),
        "0190f3f0-0000-7000-8000-0000000000a3" => {
            return Err(Status::failed_precondition(
                "payment 0190f3f0-0000-7000-8000-0000000000a3 was voided",
            ))
        }
        "0190f3f0-0000-7000-8000-0000000000a4" => {
            return Err(Status::internal("database password expired"))
        }
        _ => (PaymentStatus::Succeeded, ""),
    };
    let payment = Payment {
        payment_id,
        order_id: ORDER_ID.into(),
        amount_cents: 2500,
        currency: "USD".into(),
        payment_method: "pm_card_visa".into(),
        status: status.into(),
        decline_reason: decline_reason.into(),
        created_at_ms: 0,
        updated_at_ms: 0,
    };
    Ok(Response::new(VerifyPaymentResponse {
        payment: Some(payment),
    }))
}

struct Fakes {
    orders: Calls,
    inventory: Calls,
    payments: Calls,
    gateway: Gateway,
    cancel: CancellationToken,
}

/// Serves one fake with the standard health service, on port 0; returns its URL.
async fn serve<S>(service: S, cancel: CancellationToken) -> String
where
    S: tonic::server::NamedService
        + tower::Service<
            axum::http::Request<tonic::body::Body>,
            Response = axum::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let health = runtime::grpc::health::<S>().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(
                runtime::grpc::incoming(listener),
                cancel.cancelled_owned(),
            ),
    );
    url
}

impl Fakes {
    async fn start() -> Fakes {
        Self::start_with(false).await
    }

    /// `older_payments`: payment-svc is older than VerifyCustomerPayment.
    async fn start_with(older: bool) -> Fakes {
        let cancel = CancellationToken::new();
        let (orders, inventory, payments) = (Calls::default(), Calls::default(), Calls::default());
        let order_url = serve(
            OrderServiceServer::new(FakeOrders(orders.clone())),
            cancel.clone(),
        )
        .await;
        let inventory_url = serve(
            InventoryServiceServer::new(FakeInventory(inventory.clone())),
            cancel.clone(),
        )
        .await;
        let payment_url = serve(
            PaymentServiceServer::new(FakePayments {
                calls: payments.clone(),
                older,
            }),
            cancel.clone(),
        )
        .await;
        let gateway = Gateway::start(&order_url, &inventory_url, &payment_url, 10_000).await;
        Fakes {
            orders,
            inventory,
            payments,
            gateway,
            cancel,
        }
    }

    async fn stop(self) {
        self.gateway.stop().await;
        self.cancel.cancel();
    }
}

fn valid_order() -> serde_json::Value {
    json!({"customer_id": "cust-1", "items": [{"sku": "SKU-1", "quantity": 2}], "payment_method": "pm_card_visa"})
}

#[tokio::test]
async fn create_order_forwards_the_request_and_context_and_answers_201() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let response = gateway
        .client
        .post(gateway.url("/orders"))
        .header("x-correlation-id", "corr-create-1")
        .header("traceparent", TRACEPARENT)
        .header("idempotency-key", "key-1")
        .json(&valid_order())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(response.headers()["x-correlation-id"], "corr-create-1");
    assert_eq!(
        response.headers()["location"],
        format!("/orders/{ORDER_ID}").as_str()
    );
    assert!(response.headers().get("idempotent-replayed").is_none());
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({
            "order_id": ORDER_ID,
            "customer_id": "cust-1",
            "status": "PENDING",
            "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1250, "line_total_cents": 2500}],
            "total_cents": 2500,
            "currency": "USD",
            "payment_method": "pm_card_visa",
            "payment_id": null,
            "failure_reason": null,
            "created_at": "2023-11-14T22:13:20.000Z",
            "updated_at": "2023-11-14T22:13:20.000Z",
        })
    );

    let seen = fakes.orders.last();
    assert_eq!(seen.correlation_id.as_deref(), Some("corr-create-1"));
    assert_eq!(seen.traceparent.as_deref(), Some(TRACEPARENT));
    assert!(
        seen.request.contains(r#"idempotency_key: "key-1""#),
        "{}",
        seen.request
    );
    assert!(
        seen.request.contains(r#"customer_id: "cust-1""#),
        "{}",
        seen.request
    );
    assert!(
        seen.request.contains(r#"payment_method: "pm_card_visa""#),
        "{}",
        seen.request
    );
    assert!(seen.request.contains("quantity: 2"), "{}", seen.request);
    fakes.stop().await;
}

#[tokio::test]
async fn a_replayed_order_is_the_same_201_marked_idempotent_replayed() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let response = gateway
        .client
        .post(gateway.url("/orders"))
        .header("idempotency-key", "seen-before")
        .json(&valid_order())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["order_id"], ORDER_ID);
    // No header given: the gateway made one id and sent the service that same id.
    let seen = fakes.orders.last();
    assert!(seen
        .correlation_id
        .is_some_and(|id| uuid::Uuid::parse_str(&id).is_ok()));
    assert_eq!(seen.traceparent, None);
    fakes.stop().await;
}

#[tokio::test]
async fn a_refusal_of_the_order_service_is_422_with_its_message() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let response = gateway
        .client
        .post(gateway.url("/orders"))
        .json(&json!({"customer_id": "cust-1", "items": [], "payment_method": "pm_card_visa"}))
        .send()
        .await
        .unwrap();
    let body = error_body(response, 422, "invalid_request").await;
    assert_eq!(
        body["error"]["message"],
        "items: at least one item is required"
    );
    fakes.stop().await;
}

#[tokio::test]
async fn get_order_is_200_with_the_order_and_404_when_unknown() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let response = gateway
        .client
        .get(gateway.url(&format!("/orders/{ORDER_ID}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "FAILED");
    assert_eq!(body["payment_id"], "pay-1");
    assert_eq!(body["failure_reason"], "payment declined: card_declined");

    let unknown = uuid::Uuid::new_v4();
    let response = gateway
        .client
        .get(gateway.url(&format!("/orders/{unknown}")))
        .header("x-correlation-id", "corr-404")
        .send()
        .await
        .unwrap();
    let body = error_body(response, 404, "not_found").await;
    assert_eq!(body["correlation_id"], "corr-404");
    assert_eq!(
        fakes.orders.last().correlation_id.as_deref(),
        Some("corr-404")
    );
    fakes.stop().await;
}

#[tokio::test]
async fn verify_payment_answers_the_outcome_declined_included_and_409_when_voided() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let verify = |payment_id: &str| {
        gateway
            .client
            .post(gateway.url("/payment/verify"))
            .header("traceparent", TRACEPARENT)
            .json(&json!({"payment_id": payment_id}))
            .send()
    };

    let response = verify("0190f3f0-0000-7000-8000-0000000000a1")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"payment_id": "0190f3f0-0000-7000-8000-0000000000a1", "order_id": ORDER_ID, "status": "SUCCEEDED", "decline_reason": null,
               "amount_cents": 2500, "currency": "USD"})
    );
    assert_eq!(
        fakes.payments.last().traceparent.as_deref(),
        Some(TRACEPARENT)
    );

    let response = verify("0190f3f0-0000-7000-8000-0000000000a2")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "DECLINED");
    assert_eq!(body["decline_reason"], "card_declined");

    let body = error_body(
        verify("0190f3f0-0000-7000-8000-0000000000a3")
            .await
            .unwrap(),
        409,
        "conflict",
    )
    .await;
    assert_eq!(
        body["error"]["message"],
        "payment 0190f3f0-0000-7000-8000-0000000000a3 was voided"
    );

    // An internal failure is a 500 that does not show the service's details.
    let body = error_body(
        verify("0190f3f0-0000-7000-8000-0000000000a4")
            .await
            .unwrap(),
        500,
        "internal",
    )
    .await;
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("password"),
        "{body}"
    );
    fakes.stop().await;
}

#[tokio::test]
async fn products_join_the_catalog_with_the_stock() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let response = gateway
        .client
        .get(gateway.url("/products"))
        .header("x-correlation-id", "corr-products")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"products": [
            {"sku": "SKU-1", "name": "Product SKU-1", "unit_price_cents": 1250, "currency": "USD", "available": 7},
            {"sku": "SKU-2", "name": "Product SKU-2", "unit_price_cents": 999, "currency": "USD", "available": 0},
        ]})
    );
    assert_eq!(
        fakes.inventory.last().correlation_id.as_deref(),
        Some("corr-products")
    );
    fakes.stop().await;
}

#[tokio::test]
async fn readyz_is_200_when_every_service_is_serving() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let response = gateway
        .client
        .get(gateway.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "services": {"inventory-svc": "serving", "order-svc": "serving", "payment-svc": "serving"}})
    );
    fakes.stop().await;
}

/// Every customer route and the ways a token can be unusable: each a 401 with
/// `WWW-Authenticate` and the JSON error, never reaching a service.
#[tokio::test]
async fn customer_routes_refuse_a_missing_or_unusable_token_with_401() {
    use base64::Engine as _;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = |aud: &str, exp: u64| json!({"sub": "cust-1", "iss": "order-platform", "aud": aud, "exp": exp});
    let sign = |claims: serde_json::Value, secret: &str| {
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    };
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims("order-api", now + 600))
    );
    let bad: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("not a bearer", Some("Basic Y3VzdDoxMjM=".to_owned())),
        ("malformed", Some("Bearer not-a-jwt".to_owned())),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                sign(claims("order-api", now - 3600), common::SECRET)
            )),
        ),
        ("alg none", Some(format!("Bearer {alg_none}"))),
        (
            "wrongly signed",
            Some(format!(
                "Bearer {}",
                sign(claims("order-api", now + 600), "another-secret")
            )),
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                sign(claims("another-api", now + 600), common::SECRET)
            )),
        ),
    ];
    let routes = [
        (reqwest::Method::POST, "/orders".to_owned()),
        (reqwest::Method::GET, "/orders".to_owned()),
        (reqwest::Method::GET, format!("/orders/{ORDER_ID}")),
        (reqwest::Method::POST, "/payment/verify".to_owned()),
    ];
    let calls_before = fakes.orders.0.lock().unwrap().len();
    for (why, authorization) in &bad {
        for (method, path) in &routes {
            // A client of its own: the shared one sends a valid token by default.
            let mut request = reqwest::Client::new()
                .request(method.clone(), gateway.url(path))
                .json(&json!({"items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "pm_card_visa", "payment_id": ORDER_ID}));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let response = request.send().await.unwrap();
            let challenge = response
                .headers()
                .get("www-authenticate")
                .unwrap_or_else(|| panic!("{why} {method} {path}: no WWW-Authenticate"))
                .to_str()
                .unwrap()
                .to_owned();
            assert!(challenge.starts_with("Bearer realm="), "{challenge}");
            // RFC 6750: an error code only when a bearer token came.
            let token_came = !matches!(*why, "missing" | "not a bearer");
            assert_eq!(
                challenge.contains(r#"error="invalid_token""#),
                token_came,
                "{why}: {challenge}"
            );
            error_body(response, 401, "unauthorized").await;
        }
    }
    assert_eq!(
        fakes.orders.0.lock().unwrap().len(),
        calls_before,
        "no refused request reaches a service"
    );
    // The catalog and the probes stay open.
    for path in ["/products", "/healthz", "/readyz", "/openapi.json"] {
        let response = reqwest::get(gateway.url(path)).await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    fakes.stop().await;
}

#[tokio::test]
async fn a_customer_acts_on_their_own_orders_only() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let other = format!("Bearer {}", common::token("cust-2"));

    // Placing: for the token's customer; another customer in the body is refused.
    let mut body = valid_order();
    body.as_object_mut().unwrap().remove("customer_id");
    let response = gateway
        .client
        .post(gateway.url("/orders"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert!(fakes
        .orders
        .last()
        .request
        .contains(r#"customer_id: "cust-1""#));
    let response = gateway
        .client
        .post(gateway.url("/orders"))
        .header("authorization", &other)
        .json(&valid_order())
        .send()
        .await
        .unwrap();
    error_body(response, 403, "forbidden").await;

    // Reading and verifying another customer's order: the 404 of an order that does not exist.
    let unknown = "0190f3f0-0000-7000-8000-00000000ffff";
    let get = |id: &str, authorization: &str| {
        gateway
            .client
            .get(gateway.url(&format!("/orders/{id}")))
            .header("authorization", authorization)
            .send()
    };
    let theirs = error_body(get(ORDER_ID, &other).await.unwrap(), 404, "not_found").await;
    assert_eq!(theirs["error"]["message"], format!("no order {ORDER_ID}"));
    let verify = |payment_id: &str, authorization: &str| {
        gateway
            .client
            .post(gateway.url("/payment/verify"))
            .header("authorization", authorization)
            .json(&json!({"payment_id": payment_id}))
            .send()
    };
    let payment = "0190f3f0-0000-7000-8000-0000000000a1";
    let theirs = error_body(verify(payment, &other).await.unwrap(), 404, "not_found").await;
    let mine = format!("Bearer {}", common::token("cust-1"));
    let none = error_body(
        verify(UNKNOWN_PAYMENT, &mine).await.unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        theirs["error"]["message"]
            .as_str()
            .unwrap()
            .replace(payment, "ID"),
        none["error"]["message"]
            .as_str()
            .unwrap()
            .replace(UNKNOWN_PAYMENT, "ID"),
    );
    let _ = unknown;
    assert_eq!(verify(payment, &mine).await.unwrap().status().as_u16(), 200);

    // Listing: the token's customer, the service's page token as the cursor.
    let response = gateway
        .client
        .get(gateway.url("/orders?limit=5&cursor=abc"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let page: serde_json::Value = response.json().await.unwrap();
    assert_eq!(page["orders"][0]["order_id"], ORDER_ID);
    assert_eq!(page["next_cursor"], "next");
    let seen = fakes.orders.last().request;
    assert!(
        seen.contains(r#"customer_id: "cust-1""#)
            && seen.contains("page_size: 5")
            && seen.contains(r#"page_token: "abc""#),
        "{seen}"
    );
    let response = gateway
        .client
        .get(gateway.url("/orders?limit=101"))
        .send()
        .await
        .unwrap();
    error_body(response, 400, "bad_request").await;
    fakes.stop().await;
}

#[tokio::test]
async fn verify_is_one_call_and_asks_the_order_only_when_the_payment_has_no_known_owner() {
    let fakes = Fakes::start().await;
    let gateway = &fakes.gateway;
    let other = format!("Bearer {}", common::token("cust-2"));
    let verify = |payment_id: &str, authorization: Option<&str>| {
        let mut request = gateway
            .client
            .post(gateway.url("/payment/verify"))
            .json(&json!({"payment_id": payment_id}));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        request.send()
    };
    let calls = |c: &Calls| c.0.lock().unwrap().len();

    // The normal path: one VerifyCustomerPayment that names the customer, and no call to
    // order-svc.
    let (orders_before, payments_before) = (calls(&fakes.orders), calls(&fakes.payments));
    let payment = "0190f3f0-0000-7000-8000-0000000000a1";
    assert_eq!(verify(payment, None).await.unwrap().status().as_u16(), 200);
    assert_eq!(calls(&fakes.orders), orders_before, "no call to order-svc");
    assert_eq!(calls(&fakes.payments), payments_before + 1, "one call");
    let seen = fakes.payments.last().request;
    assert!(
        seen.starts_with("VerifyCustomerPayment VerifyPaymentRequest")
            && seen.contains(&format!(r#"payment_id: "{payment}""#))
            && seen.contains(r#"customer_id: "cust-1""#),
        "{seen}"
    );

    // A payment whose owner payment-svc cannot tell: its order is checked, then it is
    // verified without a customer.
    let (orders_before, payments_before) = (calls(&fakes.orders), calls(&fakes.payments));
    let response = verify(OWNER_UNKNOWN_PAYMENT, None).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["payment_id"], OWNER_UNKNOWN_PAYMENT);
    assert_eq!(body["status"], "SUCCEEDED");
    assert_eq!(calls(&fakes.orders), orders_before + 1);
    assert!(fakes
        .orders
        .last()
        .request
        .contains(r#"customer_id: "cust-1""#));
    let seen: Vec<String> = fakes.payments.0.lock().unwrap()[payments_before..]
        .iter()
        .map(|s| s.request.clone())
        .collect();
    assert_eq!(
        seen.len(),
        3,
        "VerifyCustomerPayment, GetPayment, VerifyPayment: {seen:?}"
    );
    assert!(seen[0].contains(r#"customer_id: "cust-1""#), "{seen:?}");
    assert!(seen[1].starts_with("GetPaymentRequest"), "{seen:?}");
    assert!(
        seen[2].starts_with("VerifyPayment ") && seen[2].contains(r#"customer_id: """#),
        "{seen:?}"
    );

    // Of another customer: the 404 of a payment that does not exist, and it is not verified.
    let payments_before = calls(&fakes.payments);
    let theirs = error_body(
        verify(OWNER_UNKNOWN_PAYMENT, Some(&other)).await.unwrap(),
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        theirs["error"]["message"],
        format!("payment {OWNER_UNKNOWN_PAYMENT} not found")
    );
    let seen: Vec<String> = fakes.payments.0.lock().unwrap()[payments_before..]
        .iter()
        .map(|s| s.request.clone())
        .collect();
    assert_eq!(seen.len(), 2, "VerifyCustomerPayment, GetPayment: {seen:?}");
    fakes.stop().await;
}

#[tokio::test]
async fn verify_in_front_of_a_payment_svc_older_than_verify_customer_payment_checks_the_order() {
    // An older payment-svc ignores VerifyPayment's customer_id: the gateway must not rely on it.
    let fakes = Fakes::start_with(true).await;
    let gateway = &fakes.gateway;
    let payment = "0190f3f0-0000-7000-8000-0000000000a1";
    let verify = |authorization: String| {
        gateway
            .client
            .post(gateway.url("/payment/verify"))
            .header("authorization", authorization)
            .json(&json!({"payment_id": payment}))
            .send()
    };
    let seen_since = |from: usize| -> Vec<String> {
        fakes.payments.0.lock().unwrap()[from..]
            .iter()
            .map(|s| s.request.clone())
            .collect()
    };

    // Another customer's: the order says it is not theirs, and it is never verified.
    let before = fakes.payments.0.lock().unwrap().len();
    let other = format!("Bearer {}", common::token("cust-2"));
    let theirs = error_body(verify(other).await.unwrap(), 404, "not_found").await;
    assert_eq!(
        theirs["error"]["message"],
        format!("payment {payment} not found")
    );
    let seen = seen_since(before);
    assert_eq!(seen.len(), 2, "VerifyCustomerPayment, GetPayment: {seen:?}");
    assert!(
        seen.iter().all(|s| !s.starts_with("VerifyPayment ")),
        "{seen:?}"
    );

    // Its owner's: checked by its order, then verified.
    let before = fakes.payments.0.lock().unwrap().len();
    let owner = format!("Bearer {}", common::token("cust-1"));
    let response = verify(owner).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "SUCCEEDED");
    assert!(fakes
        .orders
        .last()
        .request
        .contains(r#"customer_id: "cust-1""#));
    let seen = seen_since(before);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].starts_with("VerifyCustomerPayment "), "{seen:?}");
    assert!(seen[1].starts_with("GetPaymentRequest"), "{seen:?}");
    assert!(seen[2].starts_with("VerifyPayment "), "{seen:?}");
    fakes.stop().await;
}
