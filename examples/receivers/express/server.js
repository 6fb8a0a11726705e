// An Express receiver for postbox webhooks.
//
// It verifies the Standard Webhooks signature with the official
// `standardwebhooks` package, records each new webhook-id in a small
// persistent inbox (a retry or replay of the same event is acknowledged and
// ignored), answers 200 at once and processes the event afterwards.
//
//   npm ci && WEBHOOK_SECRET=whsec_... node server.js
//
// Environment: WEBHOOK_SECRET (required), HOST (127.0.0.1), PORT (8000),
// RECEIVER_STATE_DIR (./state), RECEIVER_OUTPUT (<state>/processed.jsonl),
// RECEIVER_FAIL_FIRST (0), RECEIVER_PROCESS_DELAY_MS (0). See ../README.md.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const express = require("express");
const { Webhook } = require("standardwebhooks");
const { Inbox } = require("./inbox");

const secret = process.env.WEBHOOK_SECRET;
if (!secret) {
  console.error("WEBHOOK_SECRET is required (the endpoint's whsec_... secret)");
  process.exit(2);
}
const stateDir = process.env.RECEIVER_STATE_DIR || "state";
const output = process.env.RECEIVER_OUTPUT || path.join(stateDir, "processed.jsonl");
const processDelay = Number(process.env.RECEIVER_PROCESS_DELAY_MS || 0);
// Test aid: answer the first N verified deliveries with 500.
let failFirst = Number(process.env.RECEIVER_FAIL_FIRST || 0);

// The application's work. Here: append one JSON line per event.
async function processEvent(webhookId, payload) {
  if (processDelay > 0) {
    await new Promise((resolve) => setTimeout(resolve, processDelay)); // stands in for slow work
  }
  const record = { receiver: "express", webhook_id: webhookId, payload };
  fs.appendFileSync(output, `${JSON.stringify(record)}\n`);
  console.log(`processed ${webhookId} (message ${payload.data.id})`);
}

const webhook = new Webhook(secret);
const inbox = new Inbox(stateDir, processEvent);
const app = express();

// express.raw keeps the body as the exact bytes that were signed; a JSON
// parser would re-serialise it and break the signature.
app.post("/webhook", express.raw({ type: () => true, limit: "1mb" }), (req, res) => {
  const body = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
  try {
    // Checks the signature and that webhook-timestamp is within 5 minutes.
    webhook.verify(body, req.headers);
  } catch (err) {
    console.warn(`rejected a webhook: ${err.message}`);
    return res.status(400).json({ error: "invalid signature" });
  }

  if (failFirst > 0) {
    failFirst -= 1;
    return res.status(500).json({ error: "failing on purpose (RECEIVER_FAIL_FIRST)" });
  }

  const webhookId = req.get("webhook-id");
  if (inbox.add(webhookId, body.toString("utf8"))) {
    return res.status(200).json({ status: "accepted" });
  }
  console.log(`duplicate delivery of ${webhookId} acknowledged`);
  return res.status(200).json({ status: "duplicate" });
});

const host = process.env.HOST || "127.0.0.1";
const port = Number(process.env.PORT || 8000);
app.listen(port, host, () => console.log(`listening on http://${host}:${port}/webhook`));
