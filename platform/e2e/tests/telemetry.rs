//! End to end: what engineers and operators see of the five real services. One order is one
//! trace (received by an in-process OTLP collector, as Jaeger would), every log line written
//! while it runs carries its correlation id, and `/metrics` counts exactly the orders placed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::TestPlatform;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use platform::services::SERVICES;
use serde_json::{json, Value};

const SAGA_TIMEOUT: Duration = Duration::from_secs(60);
/// The services with an outbox (all but the gateway).
const OUTBOX_SERVICES: [&str; 4] = ["payment-svc", "inventory-svc", "order-svc", "orchestrator"];

// ---------------------------------------------------------------------------------------------
// An OTLP/gRPC trace receiver, in process.
// ---------------------------------------------------------------------------------------------

/// A span as received, with what the assertions need.
#[derive(Clone, Debug)]
struct Received {
    service: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: SpanKind,
    attributes: HashMap<String, String>,
    /// Name and attributes of each event.
    events: Vec<(String, HashMap<String, String>)>,
    /// Trace and span id of each link.
    links: Vec<(String, String)>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(values: &[KeyValue]) -> HashMap<String, String> {
    values
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        service: service.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                        name: span.name,
                        attributes: attributes(&span.attributes),
                        events: span
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), attributes(&e.attributes)))
                            .collect(),
                        links: span
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Listens on a free port of 127.0.0.1 until the test ends.
    async fn start() -> (Collector, SocketAddr) {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("collector port");
        let addr = listener.local_addr().expect("collector address");
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(server);
        (collector, addr)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("spans").clone()
    }

    /// Waits until `done` holds for the spans received so far.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            if Instant::now() > deadline {
                let names: BTreeSet<String> = spans
                    .iter()
                    .map(|s| format!("{}: {}", s.service, s.name))
                    .collect();
                panic!("{what}: not received within 30 s; spans received: {names:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A client that names its requests.
// ---------------------------------------------------------------------------------------------

/// Sends `method path` to the gateway with `headers`; returns status, headers and JSON body.
async fn send(
    platform: &TestPlatform,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = platform
        .http
        .request(method.clone(), format!("{}{path}", platform.gateway));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// Polls the order (sending `headers`) until `done` holds.
async fn wait_for_order(
    platform: &TestPlatform,
    order_id: &str,
    headers: &[(&str, &str)],
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + SAGA_TIMEOUT;
    loop {
        let (status, _, order) = send(
            platform,
            reqwest::Method::GET,
            &format!("/orders/{order_id}"),
            headers,
            None,
        )
        .await;
        if status.is_success() && done(&order) {
            return order;
        }
        assert!(
            Instant::now() < deadline,
            "order {order_id} did not get there within {SAGA_TIMEOUT:?}: {order}; logs in {}",
            platform.log_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn order_body(sku: &str, payment_method: &str) -> Value {
    json!({
        "items": [{"sku": sku, "quantity": 1}],
        "payment_method": payment_method,
    })
}

fn random_hex(len: usize) -> String {
    let mut out = String::new();
    while out.len() < len {
        out.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// One order, one trace.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_order_is_one_trace_across_the_five_services() {
    let (collector, collector_addr) = Collector::start().await;
    let endpoint = format!("http://{collector_addr}");
    let platform = TestPlatform::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ])
    .await;
    platform.warm_up().await;

    // The client starts the trace; the gateway continues it.
    let trace_id = random_hex(32);
    let client_span_id = random_hex(16);
    let traceparent = format!("00-{trace_id}-{client_span_id}-01");
    let (status, _, created) = send(
        &platform,
        reqwest::Method::POST,
        "/orders",
        &[("traceparent", &traceparent)],
        Some(&order_body("SKU-MOUSE", "pm_card_visa")),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let order_id = created["order_id"].as_str().expect("order_id").to_owned();
    let initiated =
        wait_for_order(&platform, &order_id, &[], |o| o["payment_id"].is_string()).await;
    let payment_id = initiated["payment_id"]
        .as_str()
        .expect("payment_id")
        .to_owned();

    // The client verifies later, in a request of its own (a trace of its own).
    let (status, _, verified) = send(
        &platform,
        reqwest::Method::POST,
        "/payment/verify",
        &[],
        Some(&json!({ "payment_id": payment_id })),
    )
    .await;
    assert_eq!(status, 200, "{verified}");
    let completed = wait_for_order(&platform, &order_id, &[], |o| {
        o["status"] == "COMPLETED" || o["status"] == "FAILED"
    })
    .await;
    assert_eq!(completed["status"], "COMPLETED", "{completed}");

    // Wait for the last hops' spans (order-svc completing the order, the orchestrator taking
    // its confirmation), the parent of every consumer span, and the verify request's spans
    // (exports come in batches).
    let spans = collector
        .wait_for("the order's whole trace", |spans| {
            let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
            let in_trace = || spans.iter().filter(|s| s.trace_id == trace_id);
            let completes = in_trace().any(|s| {
                s.service == "order-svc"
                    && s.kind == SpanKind::Consumer
                    && s.attribute("message_type") == Some("order.v1.CompleteOrder")
            }) && in_trace().any(|s| {
                s.service == "orchestrator"
                    && s.kind == SpanKind::Consumer
                    && s.attribute("message_type") == Some("order.v1.OrderCompleted")
            });
            let parents = in_trace()
                .filter(|s| s.kind == SpanKind::Consumer)
                .all(|s| ids.contains(s.parent_span_id.as_str()));
            let verify_linked = in_trace()
                .filter(|s| s.name == "payment.verify")
                .flat_map(|s| &s.links)
                .any(|(linked_trace, _)| {
                    spans.iter().any(|s| {
                        s.trace_id == *linked_trace
                            && s.service == "gateway"
                            && s.name == "POST /payment/verify"
                    })
                });
            completes && parents && verify_linked
        })
        .await;
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == trace_id).collect();

    // One trace id holds spans of all five services.
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        SERVICES.into_iter().collect::<BTreeSet<_>>(),
        "services in the order's trace"
    );

    // The gateway honoured the client's traceparent.
    let post = trace
        .iter()
        .find(|s| s.service == "gateway" && s.name == "POST /orders")
        .expect("the gateway's POST /orders span");
    assert_eq!(post.kind, SpanKind::Server);
    assert_eq!(post.parent_span_id, client_span_id);
    assert_eq!(post.attribute("http.response.status_code"), Some("201"));

    // gRPC between the gateway and order-svc: a server span named by the RPC, under the
    // gateway's.
    let create = trace
        .iter()
        .find(|s| s.service == "order-svc" && s.name == "order.v1.OrderService/CreateOrder")
        .expect("order-svc's CreateOrder span");
    assert_eq!(create.kind, SpanKind::Server);
    assert_eq!(create.attribute("rpc.system"), Some("grpc"));
    assert_eq!(create.attribute("rpc.method"), Some("CreateOrder"));
    let create_parent = by_id
        .get(create.parent_span_id.as_str())
        .expect("CreateOrder's parent span");
    assert_eq!(create_parent.service, "gateway");

    // Every consumer span is a child of the span that produced its message, in another
    // process, however much later the outbox relay published it.
    let consumers: Vec<&&Received> = trace
        .iter()
        .filter(|s| s.kind == SpanKind::Consumer)
        .collect();
    assert!(
        consumers.len() >= 10,
        "a saga crosses Kafka at least ten times; consumer spans: {:#?}",
        consumers
            .iter()
            .map(|s| (&s.service, s.attribute("message_type")))
            .collect::<Vec<_>>()
    );
    for consumer in &consumers {
        let message_id = consumer
            .attribute("messaging.message.id")
            .expect("messaging.message.id");
        assert!(
            consumer.name.ends_with(" process"),
            "consumer span name: {}",
            consumer.name
        );
        assert_eq!(consumer.attribute("order_id"), Some(order_id.as_str()));
        assert!(consumer.attribute("messaging.destination.name").is_some());
        assert!(consumer
            .attribute("messaging.kafka.destination.partition")
            .is_some());
        let parent = by_id
            .get(consumer.parent_span_id.as_str())
            .unwrap_or_else(|| panic!("no parent span received for {consumer:#?}"));
        assert_eq!(parent.trace_id, trace_id);
        let produced_it = parent.events.iter().any(|(name, attributes)| {
            name == "message enqueued"
                && attributes.get("messaging.message.id").map(String::as_str) == Some(message_id)
        });
        assert!(
            produced_it,
            "the parent of {} ({}) did not produce message {message_id}: {parent:#?}",
            consumer.name, consumer.service
        );
    }

    // The saga's own words.
    let names: BTreeSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "order.create",
        "saga.transition",
        "inventory.reserve",
        "payment.charge",
        "payment.verify",
        "inventory.commit",
        "outbox.publish",
    ] {
        assert!(names.contains(expected), "no {expected} span in {names:#?}");
    }
    let transitions: BTreeSet<(String, String)> = trace
        .iter()
        .filter(|s| s.name == "saga.transition")
        .map(|s| {
            assert_eq!(s.attribute("order_id"), Some(order_id.as_str()));
            (
                s.attribute("from").unwrap_or_default().to_owned(),
                s.attribute("to").unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for step in [
        ("-", "RESERVING"),
        ("RESERVING", "CHARGING"),
        ("CHARGING", "AWAITING_VERIFICATION"),
        ("AWAITING_VERIFICATION", "COMMITTING"),
        ("COMMITTING", "COMPLETING"),
        ("COMPLETING", "COMPLETED"),
    ] {
        assert!(
            transitions.contains(&(step.0.to_owned(), step.1.to_owned())),
            "no saga.transition {step:?} in {transitions:?}"
        );
    }
    let publish = trace
        .iter()
        .find(|s| s.name == "outbox.publish")
        .expect("outbox.publish");
    assert_eq!(publish.kind, SpanKind::Producer);
    assert!(publish.attribute("messaging.batch.message_count").is_some());

    // The separate verify request has a trace of its own (the gateway's span, payment-svc's
    // VerifyCustomerPayment under it), which the saga's payment.verify span links to.
    let verify = trace
        .iter()
        .find(|s| s.name == "payment.verify")
        .expect("payment.verify in the order's trace");
    assert_eq!(verify.service, "payment-svc");
    let (request_trace, request_span) = verify.links.first().expect("a link");
    assert_ne!(*request_trace, trace_id);
    let linked = by_id
        .get(request_span.as_str())
        .expect("the linked span was received");
    assert_eq!(linked.service, "payment-svc");
    assert_eq!(
        linked.name,
        "payment.v1.PaymentService/VerifyCustomerPayment"
    );
    assert_eq!(linked.trace_id, *request_trace);
    let gateway_verify = by_id
        .get(linked.parent_span_id.as_str())
        .expect("VerifyCustomerPayment's parent");
    assert_eq!(gateway_verify.service, "gateway");
    assert_eq!(gateway_verify.name, "POST /payment/verify");
}

// ---------------------------------------------------------------------------------------------
// Correlation ids in every log line.
// ---------------------------------------------------------------------------------------------

fn log_sizes(platform: &TestPlatform) -> BTreeMap<&'static str, u64> {
    SERVICES
        .into_iter()
        .map(|service| {
            let path = platform.log_dir.join(format!("{service}.log"));
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            (service, size)
        })
        .collect()
}

/// What each service logged after `since`.
fn logged_since(
    platform: &TestPlatform,
    since: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, Vec<String>> {
    since
        .iter()
        .map(|(service, from)| {
            let path = platform.log_dir.join(format!("{service}.log"));
            let text = std::fs::read(&path).unwrap_or_default();
            let new = String::from_utf8_lossy(&text[(*from as usize).min(text.len())..])
                .lines()
                .map(str::to_owned)
                .collect();
            (*service, new)
        })
        .collect()
}

#[tokio::test]
async fn every_log_line_written_for_an_order_carries_its_correlation_id() {
    // Every line, the per-message ones (at debug) included.
    let platform = TestPlatform::start(&[
        ("LOG_FORMAT", "json"),
        (
            "RUST_LOG",
            "debug,sqlx=warn,h2=info,hyper=info,rdkafka=info,tonic=info",
        ),
    ])
    .await;
    platform.warm_up().await;
    let before = log_sizes(&platform);

    let correlation_id = format!("corr-{}", random_hex(12));
    let headers = [("X-Correlation-ID", correlation_id.as_str())];
    let (status, response_headers, created) = send(
        &platform,
        reqwest::Method::POST,
        "/orders",
        &headers,
        Some(&order_body("SKU-KEYBOARD", "pm_card_visa")),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        response_headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok()),
        Some(correlation_id.as_str())
    );
    let order_id = created["order_id"].as_str().expect("order_id").to_owned();
    let initiated = wait_for_order(&platform, &order_id, &headers, |o| {
        o["payment_id"].is_string()
    })
    .await;
    let (status, _, verified) = send(
        &platform,
        reqwest::Method::POST,
        "/payment/verify",
        &headers,
        Some(&json!({ "payment_id": initiated["payment_id"] })),
    )
    .await;
    assert_eq!(status, 200, "{verified}");
    let completed = wait_for_order(&platform, &order_id, &headers, |o| {
        o["status"] == "COMPLETED" || o["status"] == "FAILED"
    })
    .await;
    assert_eq!(completed["status"], "COMPLETED", "{completed}");

    for (service, lines) in logged_since(&platform, &before) {
        assert!(
            !lines.is_empty(),
            "{service} wrote no log line while handling the order"
        );
        for line in lines {
            let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("{service}: LOG_FORMAT=json wrote a line that is not one JSON object ({e}): {line}")
            });
            assert!(parsed.is_object(), "{service}: {line}");
            // The Kafka client's own warnings (a broker connection, say) are about no order.
            let target = parsed["target"].as_str().unwrap_or_default();
            if target.starts_with("librdkafka") || target.starts_with("rdkafka") {
                continue;
            }
            assert!(
                line.contains(&correlation_id),
                "{service}: a log line without the order's correlation id {correlation_id}: {line}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus metrics.
// ---------------------------------------------------------------------------------------------

/// A metric that must move: service, name, labels (a subset of the series'), increase.
type Expected<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, f64);

/// Samples of a Prometheus text exposition: (name, labels) -> value.
type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

fn parse_metrics(text: &str) -> Samples {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample line");
        let value: f64 = value.parse().unwrap_or(f64::NAN);
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let labels = body
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) = pair.split_once('=').expect("label=value");
                        (key.to_owned(), value.trim_matches('"').to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        samples.push((name, labels, value));
    }
    samples
}

/// The sum of the samples of `name` whose labels include `labels` (0 when there are none).
fn sum(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn has(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> bool {
    samples.iter().any(|(n, l, _)| {
        n == name
            && labels
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
    })
}

async fn scrape(platform: &TestPlatform) -> BTreeMap<&'static str, Samples> {
    let mut all = BTreeMap::new();
    for service in SERVICES {
        let addr = platform
            .config
            .addresses
            .metrics_of(service)
            .expect("a metrics address");
        let text = platform
            .http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{service}: GET /metrics: {e}"))
            .text()
            .await
            .expect("metrics text");
        all.insert(service, parse_metrics(&text));
    }
    all
}

#[tokio::test]
async fn metrics_count_exactly_the_orders_placed() {
    // order-svc asks payment-svc about every order's payment method (none remembered), so
    // that ValidatePaymentMethod counts one call per order too.
    let platform = TestPlatform::start(&[("PAYMENT_METHOD_CACHE_SECS", "0")]).await;
    platform.warm_up().await;
    let before = scrape(&platform).await;

    // Two orders complete, one is declined at verification.
    let mut orders = Vec::new();
    for method in [
        "pm_card_visa",
        "pm_card_mastercard",
        "pm_card_chargeDeclined",
    ] {
        orders.push(platform.place_order("SKU-HEADSET", 1, method).await);
    }
    for order_id in &orders {
        let payment_id = platform.payment_id(order_id).await;
        let (status, body) = platform
            .post("/payment/verify", &json!({ "payment_id": payment_id }))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut outcomes = Vec::new();
    for order_id in &orders {
        outcomes.push(platform.final_order(order_id).await["status"].clone());
    }
    assert_eq!(outcomes, ["COMPLETED", "COMPLETED", "FAILED"]);

    let topic = |name: &str| format!("{}{name}", platform.config.topic_prefix);
    let (order_events, saga_replies) = (topic("order.events"), topic("saga.replies"));
    let (inventory_commands, payment_commands, order_commands) = (
        topic("inventory.commands"),
        topic("payment.commands"),
        topic("order.commands"),
    );
    // (service, metric, labels, increase) that exactly these orders make.
    let expected: Vec<Expected> = vec![
        ("orchestrator", "sagas_started_total", vec![], 3.0),
        ("orchestrator", "sagas_completed_total", vec![], 2.0),
        (
            "orchestrator",
            "sagas_failed_total",
            vec![("reason", "payment_declined")],
            1.0,
        ),
        ("orchestrator", "sagas_failed_total", vec![], 1.0),
        (
            "orchestrator",
            "saga_step_duration_seconds_count",
            vec![("step", "RESERVING")],
            3.0,
        ),
        (
            "orchestrator",
            "saga_step_duration_seconds_count",
            vec![("step", "CHARGING")],
            3.0,
        ),
        (
            "orchestrator",
            "saga_step_duration_seconds_count",
            vec![("step", "AWAITING_VERIFICATION")],
            3.0,
        ),
        (
            "orchestrator",
            "saga_step_duration_seconds_count",
            vec![("step", "COMMITTING")],
            2.0,
        ),
        (
            "orchestrator",
            "saga_step_duration_seconds_count",
            vec![("step", "COMPENSATING")],
            1.0,
        ),
        (
            "orchestrator",
            "messages_handled_total",
            vec![("topic", &order_events)],
            3.0,
        ),
        (
            "orchestrator",
            "messages_handled_total",
            // Five replies a saga: reserved, initiated, paid or declined, committed or
            // released, and order-svc's confirmation of the order's final status.
            vec![("topic", &saga_replies)],
            15.0,
        ),
        (
            "inventory-svc",
            "messages_handled_total",
            vec![("topic", &inventory_commands)],
            6.0,
        ),
        (
            "payment-svc",
            "messages_handled_total",
            vec![("topic", &payment_commands)],
            3.0,
        ),
        (
            "order-svc",
            "messages_handled_total",
            vec![("topic", &order_commands)],
            6.0,
        ),
        (
            "order-svc",
            "outbox_published_total",
            vec![("topic", &order_events)],
            3.0,
        ),
        (
            "order-svc",
            "grpc_requests_total",
            vec![
                ("service", "order.v1.OrderService"),
                ("method", "CreateOrder"),
                ("code", "OK"),
            ],
            3.0,
        ),
        (
            "order-svc",
            "grpc_request_duration_seconds_count",
            vec![
                ("service", "order.v1.OrderService"),
                ("method", "CreateOrder"),
            ],
            3.0,
        ),
        (
            "payment-svc",
            "grpc_requests_total",
            vec![("method", "ValidatePaymentMethod"), ("code", "OK")],
            3.0,
        ),
        (
            "payment-svc",
            "grpc_requests_total",
            vec![
                ("service", "payment.v1.PaymentService"),
                ("method", "VerifyCustomerPayment"),
                ("code", "OK"),
            ],
            3.0,
        ),
        (
            "gateway",
            "http_requests_total",
            vec![("route", "/orders"), ("status", "201")],
            3.0,
        ),
        (
            "gateway",
            "http_request_duration_seconds_count",
            vec![("route", "/orders")],
            3.0,
        ),
        (
            "gateway",
            "http_requests_total",
            vec![("route", "/payment/verify"), ("status", "200")],
            3.0,
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let after = scrape(&platform).await;
        let settled = OUTBOX_SERVICES.iter().all(|service| {
            let samples = &after[service];
            has(samples, "outbox_backlog", &[]) && sum(samples, "outbox_backlog", &[]) == 0.0
        });
        let counted = expected.iter().all(|(service, name, labels, increase)| {
            sum(&after[service], name, labels) - sum(&before[service], name, labels) >= *increase
        });
        if (settled && counted) || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (service, name, labels, increase) in &expected {
        let moved = sum(&after[service], name, labels) - sum(&before[service], name, labels);
        assert_eq!(moved, *increase, "{service}: {name}{labels:?}");
    }
    for service in SERVICES {
        assert_eq!(
            sum(&after[service], "dead_letters_total", &[]),
            0.0,
            "{service}: dead letters"
        );
    }
    for service in OUTBOX_SERVICES {
        let samples = &after[service];
        assert!(
            has(samples, "outbox_backlog", &[]),
            "{service}: outbox_backlog"
        );
        assert_eq!(
            sum(samples, "outbox_backlog", &[]),
            0.0,
            "{service}: outbox_backlog"
        );
        assert!(
            has(samples, "outbox_oldest_age_seconds", &[]),
            "{service}: outbox_oldest_age_seconds"
        );
    }
    // Lag is reported for each topic consumed, from librdkafka's statistics (every 5 s).
    for (service, topic) in [
        ("orchestrator", &saga_replies),
        ("inventory-svc", &inventory_commands),
        ("payment-svc", &payment_commands),
        ("order-svc", &order_commands),
    ] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let samples = scrape(&platform).await;
            if has(&samples[service], "consumer_lag", &[("topic", topic)]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{service}: no consumer_lag for {topic}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
