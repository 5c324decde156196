-- The order's customer, from the ChargePayment command, so that a verification on a customer's
-- behalf checks the payment is theirs in the statement that starts it. NULL for a payment
-- charged before this column (or by an orchestrator that does not send it): its verification
-- cannot check the customer here, and the caller checks the order's customer itself.
ALTER TABLE payments ADD COLUMN customer_id TEXT;
