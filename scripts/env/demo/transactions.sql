-- Business transactions, each writing its row and its outbox event in ONE transaction.
BEGIN;
WITH o AS (INSERT INTO orders (customer, total_cents) VALUES ('ada', 4200) RETURNING id, customer, total_cents)
INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
SELECT 'Order', o.id::text, 'OrderCreated', jsonb_build_object('orderId', o.id, 'customer', o.customer, 'totalCents', o.total_cents) FROM o;
COMMIT;

BEGIN;
WITH o AS (INSERT INTO orders (customer, total_cents) VALUES ('grace', 1999) RETURNING id, customer, total_cents)
INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
SELECT 'Order', o.id::text, 'OrderCreated', jsonb_build_object('orderId', o.id, 'customer', o.customer, 'totalCents', o.total_cents) FROM o;
INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
SELECT 'Payment', 'pay-' || id, 'PaymentRequested', jsonb_build_object('orderId', id, 'amountCents', total_cents) FROM orders WHERE customer = 'grace' ORDER BY id DESC LIMIT 1;
COMMIT;

-- A rolled-back transaction: its event never reaches Kafka.
BEGIN;
INSERT INTO orders (customer, total_cents) VALUES ('mallory', 1);
INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', 'never', 'OrderCreated', '{"rolledBack": true}');
ROLLBACK;

BEGIN;
UPDATE orders SET total_cents = total_cents + 100 WHERE customer = 'ada';
INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
SELECT 'Order', id::text, 'OrderAmended', jsonb_build_object('orderId', id, 'totalCents', total_cents) FROM orders WHERE customer = 'ada' ORDER BY id DESC LIMIT 1;
COMMIT;
