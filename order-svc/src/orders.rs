//! Placing and reading orders: what the gRPC API does, with no protocol in it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, SubsecRound as _, Utc};
use messaging::{MessageContext, Outbox, OutboxRows};
use sqlx::PgPool;

use crate::convert;
use crate::domain::{self, Order, OrderId, OrderRequest, OrderStatus, Product};
use crate::error::Error;
use crate::payments::PaymentMethods;
use crate::store::{self, Inserted, NewOrder};
use crate::watch::RecentOrders;

/// The outcome of placing an order.
#[derive(Clone, Debug)]
pub struct Placed {
    pub order: Order,
    /// The idempotency key matched an order placed earlier, which is returned unchanged.
    pub replayed: bool,
}

#[derive(Clone, Debug)]
pub struct Orders {
    pool: PgPool,
    outbox: Outbox,
    payments: PaymentMethods,
    catalog: Catalog,
    recent: RecentOrders,
}

impl Orders {
    /// `recent`: where the orders placed here are kept for long polls (the status watch's).
    pub fn new(
        pool: PgPool,
        outbox: Outbox,
        payments: PaymentMethods,
        recent: RecentOrders,
    ) -> Self {
        Self {
            pool,
            outbox,
            payments,
            catalog: Catalog::default(),
            recent,
        }
    }

    /// Prices `request` from the catalog and stores the order as PENDING together with its
    /// `OrderCreated` event, in one statement. With an idempotency key already used for the
    /// same request, returns that order and records nothing.
    pub async fn place(
        &self,
        request: OrderRequest,
        context: &MessageContext,
    ) -> Result<Placed, Error> {
        let fingerprint = request.fingerprint();
        let key = request.idempotency_key.as_deref();
        // Priced from the copy of the catalog; the statement that stores the order checks the
        // prices against the catalog, and a product changed since is read again.
        let mut reread = false;
        loop {
            let catalog = self
                .catalog
                .products(&self.pool, &request.skus(), reread)
                .await?;
            let priced = match domain::price(&request, &catalog) {
                Ok(priced) => priced,
                Err(e) => return self.replay_or(key, &fingerprint, e).await,
            };
            if let Err(e) = self
                .payments
                .validate(&request.payment_method, context)
                .await
            {
                return self.replay_or(key, &fingerprint, e).await;
            }

            // Microseconds, as PostgreSQL stores them: the event carries what the row holds.
            let now = Utc::now().trunc_subsecs(6);
            let order = Order {
                id: OrderId::generate(),
                customer_id: request.customer_id.clone(),
                status: OrderStatus::Pending,
                lines: priced.lines,
                total_cents: priced.total_cents,
                currency: priced.currency,
                payment_method: request.payment_method.clone(),
                payment_id: None,
                failure_reason: None,
                correlation_id: context.correlation_id.clone(),
                created_at: now,
                updated_at: now,
            };
            let event = convert::order_created(&order);
            let messages =
                [self
                    .outbox
                    .message(proto::topics::ORDER_EVENTS, order.id.0, &event, context)];
            let new = NewOrder {
                order: &order,
                idempotency_key: key,
                request_fingerprint: &fingerprint,
            };
            // The order, its lines and its event in one statement, which commits by itself.
            // Kept for long polls before it commits, so that no change of it comes first.
            let mut conn = self.pool.acquire().await?;
            let events = OutboxRows::new(&messages)?;
            self.recent.remember(&order);
            let inserted = store::insert_order(&mut conn, &new, &events).await;
            if !matches!(inserted, Ok(Inserted::Inserted)) {
                self.recent.forget(order.id.0);
            }
            match inserted? {
                Inserted::Inserted => {
                    self.outbox.recorded(&mut conn).await?;
                    // The order's id was made for it: no row of its key came before.
                    self.outbox.committed_messages(messages, Vec::new());
                    tracing::info!(order_id = %order.id, total_cents = order.total_cents, "order placed");
                    return Ok(Placed {
                        order,
                        replayed: false,
                    });
                }
                Inserted::KeyTaken => {
                    // An order placed earlier, or by a concurrent request, holds the key.
                    drop(conn);
                    let key = key.unwrap_or_default();
                    return match self.replay(key, &fingerprint).await? {
                        Some(placed) => Ok(placed),
                        None => Err(Error::Unavailable(format!(
                            "Idempotency-Key {key:?} is being used by a concurrent request, retry later"
                        ))),
                    };
                }
                Inserted::PricesChanged if !reread => reread = true,
                Inserted::PricesChanged => {
                    return Err(Error::Unavailable(
                        "the catalog changed while the order was placed, retry".to_owned(),
                    ))
                }
            }
        }
    }

    /// The order placed earlier with the same `key` and request, if there is one; else `error`,
    /// what placing this request found wrong: a retried request is answered as it was first.
    async fn replay_or(
        &self,
        key: Option<&str>,
        fingerprint: &str,
        error: Error,
    ) -> Result<Placed, Error> {
        if let Some(key) = key {
            if let Some(placed) = self.replay(key, fingerprint).await? {
                return Ok(placed);
            }
        }
        Err(error)
    }

    /// The order placed earlier with `key`, if its request had the same fingerprint; a conflict
    /// if it was a different request.
    async fn replay(&self, key: &str, fingerprint: &str) -> Result<Option<Placed>, Error> {
        let Some((id, stored)) = store::find_by_idempotency_key(&self.pool, key).await? else {
            return Ok(None);
        };
        self.replayed(key, fingerprint, id, &stored).await.map(Some)
    }

    /// Order `id`, placed earlier with `key` by a request of fingerprint `stored`, as the
    /// answer to a request of `fingerprint`: a conflict if it was a different request.
    async fn replayed(
        &self,
        key: &str,
        fingerprint: &str,
        id: OrderId,
        stored: &str,
    ) -> Result<Placed, Error> {
        if stored != fingerprint {
            return Err(Error::Conflict(format!(
                "Idempotency-Key {key:?} was used for a different request"
            )));
        }
        let order = self.get(id).await?;
        tracing::info!(order_id = %id, "order replayed for its idempotency key");
        Ok(Placed {
            order,
            replayed: true,
        })
    }

    pub async fn get(&self, id: OrderId) -> Result<Order, Error> {
        let mut conn = self.pool.acquire().await?;
        store::get_order(&mut conn, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("order {id} not found")))
    }

    /// One page of a listing of every order (with `statuses`, when not empty), in id order,
    /// after `after`.
    pub async fn list_page(
        &self,
        after: Option<OrderId>,
        statuses: &[OrderStatus],
        limit: usize,
    ) -> Result<Vec<Order>, Error> {
        let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
        let mut conn = self.pool.acquire().await?;
        Ok(store::list_page(&mut conn, after, &statuses, limit as i64).await?)
    }

    /// Up to `limit` orders of `customer_id`, newest first, older than `before` when given.
    pub async fn list_for_customer(
        &self,
        customer_id: &str,
        before: Option<(DateTime<Utc>, OrderId)>,
        limit: usize,
    ) -> Result<Vec<Order>, Error> {
        let mut conn = self.pool.acquire().await?;
        Ok(store::list_customer_page(&mut conn, customer_id, before, limit as i64).await?)
    }

    pub async fn products(&self) -> Result<Vec<Product>, Error> {
        Ok(store::list_products(&self.pool).await?)
    }
}

/// The catalog's products as last read here, by SKU. Orders are priced from it without a read,
/// and never at a stale price: the statement that stores an order checks its prices against
/// the catalog ([`store::insert_order`]), and a product changed since is read again. Holds the
/// products ordered (a catalog's size at most), never an unknown SKU.
#[derive(Clone, Debug, Default)]
struct Catalog(Arc<RwLock<HashMap<String, Product>>>);

impl Catalog {
    /// The products among `skus` that exist: from the copy, and from the database for those
    /// it lacks (or all of them, with `reread`).
    async fn products(
        &self,
        pool: &PgPool,
        skus: &[String],
        reread: bool,
    ) -> Result<HashMap<String, Product>, sqlx::Error> {
        let mut found = HashMap::with_capacity(skus.len());
        let mut missing = Vec::new();
        {
            let known = self.0.read().unwrap_or_else(|e| e.into_inner());
            for sku in skus {
                match known.get(sku) {
                    Some(product) if !reread => {
                        found.insert(sku.clone(), product.clone());
                    }
                    _ => missing.push(sku.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        let read = store::products(pool, &missing).await?;
        let mut known = self.0.write().unwrap_or_else(|e| e.into_inner());
        for sku in &missing {
            match read.get(sku) {
                Some(product) => {
                    known.insert(sku.clone(), product.clone());
                    found.insert(sku.clone(), product.clone());
                }
                None => {
                    known.remove(sku);
                }
            }
        }
        Ok(found)
    }
}
