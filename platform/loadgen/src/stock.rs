//! The stock a run's orders take: SKUs that orders meant to get their goods use, restocked
//! before the run, and one kept empty for the orders meant to find none.

use anyhow::Context as _;

/// The SKUs orders that should succeed use (restocked before a run), and the one kept empty.
pub const IN_STOCK_SKUS: [&str; 4] = ["SKU-KEYBOARD", "SKU-MOUSE", "SKU-HEADSET", "SKU-WEBCAM"];
pub const EMPTY_SKU: &str = "SKU-MONITOR";

/// Makes stock for a run: plenty of every SKU that orders should get, none of [`EMPTY_SKU`].
pub async fn restock(inventory_url: &str) -> anyhow::Result<()> {
    let mut client =
        proto::inventory::v1::inventory_service_client::InventoryServiceClient::connect(
            inventory_url.to_owned(),
        )
        .await
        .with_context(|| format!("connecting to the inventory service at {inventory_url}"))?;
    for (sku, available) in IN_STOCK_SKUS
        .iter()
        .map(|s| (*s, 100_000_000))
        .chain([(EMPTY_SKU, 0)])
    {
        client
            .set_stock(proto::inventory::v1::SetStockRequest {
                sku: sku.to_owned(),
                available,
            })
            .await
            .with_context(|| format!("setting the stock of {sku}"))?;
    }
    Ok(())
}
