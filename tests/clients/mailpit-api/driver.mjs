// Drives the npm mailpit-api client, unmodified, for tests/test_mailpit_client.py.
// argv[2]: {"base": URL, "auth": {"username", "password"} | null, "calls": [[method, ...args], ...]}
// stdout: one JSON array, per call {"ok": result} or {"error": message}; a Blob result
// becomes {"type", "size", "text"}. Calls run in order, each after the one before.
import { MailpitClient } from "mailpit-api";

const { base, auth, calls } = JSON.parse(process.argv[2]);
const client = new MailpitClient(base, auth ? { auth } : undefined);
const results = [];
for (const [method, ...args] of calls) {
  try {
    let value = await client[method](...args);
    if (value instanceof Blob) {
      value = { type: value.type, size: value.size, text: await value.text() };
    }
    results.push({ ok: value === undefined ? null : value });
  } catch (error) {
    results.push({ error: error instanceof Error ? error.message : String(error) });
  }
}
process.stdout.write(JSON.stringify(results));
