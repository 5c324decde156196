//! The OpenAPI 3.1 document of the REST API, made from the handlers' own annotations and
//! types, with what every operation shares (the correlation and trace headers, the errors any
//! request can meet, the customer's token) added in one place.

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder};
use utoipa::OpenApi as _;

use crate::error::ErrorDocument;

/// Where the document is served.
pub const PATH: &str = "/openapi.json";

/// The name of the customers' security scheme, as operations refer to it.
pub const CUSTOMER_SCHEME: &str = "customer";

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Order platform REST API",
        description = "Place orders, follow them and verify their payments. Customer routes take \
                       `Authorization: Bearer <JWT>`: the token's `sub` is the customer, who sees \
                       and acts on their own orders only. Every response carries `X-Correlation-ID` \
                       (the client's, when it sent a usable one); errors have one JSON shape.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    components(schemas(ErrorDocument)),
    tags(
        (name = "orders", description = "A customer's orders"),
        (name = "payments", description = "Verification of an order's payment"),
        (name = "catalog", description = "Products and their stock, open to anyone"),
        (name = "health", description = "Probes, open to anyone"),
    )
)]
pub(crate) struct ApiDoc;

/// The base document, before the routes add their paths.
pub(crate) fn base() -> OpenApi {
    ApiDoc::openapi()
}

/// Adds what every operation shares to the document the routes made.
pub(crate) fn complete(mut document: OpenApi) -> OpenApi {
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        CUSTOMER_SCHEME,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .description(Some(
                    "A JWT whose `sub` is the customer, signed with the key the gateway is \
                     configured with (HS256, RS256 or ES256), with its `iss`, `aud` and `exp`. \
                     Locally: `sagactl token --customer <id>`.",
                ))
                .build(),
        ),
    );
    for (path, item) in document.paths.paths.iter_mut() {
        let probe = path == "/healthz" || path == "/readyz";
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            shared(operation, probe);
        }
    }
    document
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorDocument")))
            .build(),
    )
}

fn shared(operation: &mut Operation, probe: bool) {
    let header_parameter = |name: &str, description: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(string()))
            .build()
    };
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    parameters.extend(
        [
            header_parameter(
                "X-Correlation-ID",
                "Ties the request to every log line and message it causes; a new one is made when \
             absent or unusable (not visible ASCII, or longer than 128 characters).",
            ),
            header_parameter(
                "traceparent",
                "W3C trace context: the request's spans join the client's trace.",
            ),
            header_parameter("tracestate", "W3C trace state, with `traceparent`."),
        ]
        .map(RefOr::T),
    );

    let secured = operation.security.as_ref().is_some_and(|s| !s.is_empty());
    let responses = &mut operation.responses.responses;
    if secured {
        let www_authenticate = HeaderBuilder::new()
            .schema(Some(string()))
            .description(Some(
                "`Bearer realm=\"orders\"`, with `error=\"invalid_token\"` when a token came",
            ))
            .build();
        responses.insert(
            "401".to_owned(),
            RefOr::T(
                error_response(
                    "No token, or one that is malformed, expired, wrongly signed, or for another \
                     issuer or audience.",
                )
                .header("WWW-Authenticate", www_authenticate)
                .build(),
            ),
        );
    }
    if !probe {
        for (status, description) in [
            (
                "500",
                "An internal error; the gateway's logs have it under the correlation id.",
            ),
            (
                "503",
                "A service behind the gateway is unavailable; try again later.",
            ),
            (
                "504",
                "The request did not complete within the gateway's request timeout.",
            ),
        ] {
            responses.insert(
                status.to_owned(),
                RefOr::T(error_response(description).build()),
            );
        }
    }
    let correlation_id = HeaderBuilder::new()
        .schema(Some(string()))
        .description(Some("The request's correlation id."))
        .build();
    for response in responses.values_mut() {
        if let RefOr::T(response) = response {
            response.headers.insert(
                "X-Correlation-ID".to_owned(),
                RefOr::T(correlation_id.clone()),
            );
        }
    }
}
