// Minimal peer for the fleetpush benchmark: Node.js + ws, doing the work fleetpush does in each
// scenario. Device login per PROTOCOL §3 (HMAC-SHA256 over "sn:timestamp" with the fleet
// secret), one reply per request (§2 envelope), /admin/push/broadcast to every logged-in
// connection, /admin/device/subscribe + /api/device/status pushes, and
// POST /api/v1/devices/{sn}/commands -> push device_command to the device.
// Usage: node node_ws.js PORT   (env BENCH_DEVICE_SECRET)
'use strict';
const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 8765);
const secret = process.env.BENCH_DEVICE_SECRET || 'bench-secret';
let pushSeq = 0;
let sessionSeq = 0;
const bySn = new Map();
const subscribers = new Set();
const authed = new Set();

function reply(ws, service, requestId, values, code = 0, msg = '') {
  ws.send(JSON.stringify({
    op: 'galbot_response', service, code, msg, values, result: code === 0,
    request_id: requestId === undefined ? null : requestId,
  }));
}

function pushFrame(service, values) {
  pushSeq += 1;
  return JSON.stringify({
    op: 'galbot_push', service, code: 0, msg: '', values, result: true, request_id: `p-${pushSeq}`,
  });
}

function login(ws, req) {
  const v = req.values || {};
  const now = Math.floor(Date.now() / 1000);
  const want = crypto.createHmac('sha256', secret).update(`${v.sn}:${v.timestamp}`).digest('hex');
  if (typeof v.sn !== 'string' || v.token !== want || Math.abs(now - v.timestamp) > 300) {
    reply(ws, req.service, req.request_id, null, 401, 'login failed');
    return;
  }
  ws.sn = v.sn;
  ws.type = v.type;
  bySn.set(v.sn, ws);
  authed.add(ws);
  sessionSeq += 1;
  reply(ws, req.service, req.request_id, {
    sn: v.sn, type: v.type, session_id: `s-${sessionSeq}`, heartbeat_interval_s: 20, server_time: now,
  });
}

function onMessage(ws, data) {
  let req;
  try {
    req = JSON.parse(data);
  } catch (e) {
    reply(ws, '', null, null, 400, 'not JSON');
    return;
  }
  if (req === null || typeof req !== 'object' || typeof req.service !== 'string') {
    reply(ws, '', null, null, 400, 'missing service');
    return;
  }
  const service = req.service;
  if (service === '/api/user/login') return login(ws, req);
  if (service === '/admin/auth/login') {
    authed.add(ws);
    return reply(ws, service, req.request_id, { token: 't', username: 'admin', role: 'admin', expires_at: '' });
  }
  if (!authed.has(ws)) return reply(ws, service, req.request_id, null, 401, 'not authenticated');
  const values = req.values || {};
  switch (service) {
    case '/admin/push/broadcast': {
      const frame = pushFrame(values.service || 'broadcast', values.message);
      let n = 0;
      for (const c of authed) {
        c.send(frame);
        n += 1;
      }
      return reply(ws, service, req.request_id, { matched: n, queued: n });
    }
    case '/admin/device/subscribe':
      subscribers.add(ws);
      return reply(ws, service, req.request_id, {});
    case '/api/device/status': {
      const ts = new Date().toISOString();
      reply(ws, service, req.request_id, { accepted: true, ts });
      if (subscribers.size) {
        const frame = pushFrame('device_status', { ...values, sn: ws.sn, type: ws.type, ts });
        for (const c of subscribers) c.send(frame);
      }
      return undefined;
    }
    case '/api/device/heartbeat':
      return reply(ws, service, req.request_id, { server_time: Date.now() / 1000 });
    case '/api/command/ack':
      return reply(ws, service, req.request_id, { command_id: values.command_id, state: 'acked' });
    default:
      return reply(ws, service, req.request_id, null, 404, 'unknown service');
  }
}

let commandSeq = 0;
const server = http.createServer((req, res) => {
  const m = req.method === 'POST' && /^\/api\/v1\/devices\/([^/]+)\/commands$/.exec(req.url);
  if (!m) {
    res.writeHead(404, { 'Content-Type': 'application/json' });
    res.end('{"code":404,"msg":"not found"}');
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
    } catch (e) {
      body = null;
    }
    const sn = decodeURIComponent(m[1]);
    const ws = bySn.get(sn);
    if (!body || !ws) {
      const out = JSON.stringify({ code: 404, msg: 'unknown device' });
      res.writeHead(404, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(out) });
      res.end(out);
      return;
    }
    commandSeq += 1;
    const commandId = `c-${commandSeq}`;
    const now = new Date();
    ws.send(pushFrame('device_command', {
      command_id: commandId, command: body.command, args: body.args || {}, issued_at: now.toISOString(),
      expires_at: new Date(now.getTime() + 1000 * (body.ttl_s || 300)).toISOString(),
    }));
    const out = JSON.stringify({ command_id: commandId, state: 'sent' });
    res.writeHead(202, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(out) });
    res.end(out);
  });
});

const wss = new WebSocketServer({ server, path: '/ws', perMessageDeflate: false, maxPayload: 65536 });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      ws.close(1003);
      return;
    }
    onMessage(ws, data.toString());
  });
  ws.on('close', () => {
    authed.delete(ws);
    subscribers.delete(ws);
    if (ws.sn && bySn.get(ws.sn) === ws) bySn.delete(ws.sn);
  });
  ws.on('error', () => {});
});

server.listen(port, '127.0.0.1', () => {
  console.log(`node ws peer listening on ws://127.0.0.1:${port}/ws`);
});
function shutdown() {
  for (const c of wss.clients) c.terminate();
  server.close();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
