// The peer's task: POST the job's payload as JSON to the benchmark's receiver, signed the
// Standard Webhooks way (as fraiseql-observers' webhook action does), on keep-alive connections
// (Node's fetch pools them). Any non-2xx answer fails the job, so graphile-worker retries it.
"use strict";
const crypto = require("crypto");

const url = process.env.BENCH_RECEIVER_URL;
const key = Buffer.from((process.env.BENCH_SECRET || "").replace(/^whsec_/, ""), "base64");

module.exports = async (payload, helpers) => {
  const body = JSON.stringify(payload);
  const id = `job_${helpers.job.id}`;
  const timestamp = Math.floor(Date.now() / 1000).toString();
  const signature = crypto
    .createHmac("sha256", key)
    .update(`${id}.${timestamp}.${body}`)
    .digest("base64");
  const response = await fetch(url, {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "webhook-id": id,
      "idempotency-key": id,
      "webhook-timestamp": timestamp,
      "webhook-signature": `v1,${signature}`,
    },
    body,
  });
  await response.arrayBuffer();
  if (!response.ok) {
    throw new Error(`the receiver answered ${response.status}`);
  }
};
