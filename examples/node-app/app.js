#!/usr/bin/env node
// The merchant's app backend reading one customer: balance, pending points, next expiry, the
// ledger (paged) and the customer's gifts. The protos are loaded from ../../proto at run time
// (@grpc/proto-loader); no generated code is committed.
//
// As the service advises, the `app` key stays on the backend: it mints a short-lived customer
// token and the reads go out with that token, which can read only this one customer.
//
// Environment:
//   LOYALTY_ENDPOINT   host:port of the service (default 127.0.0.1:50051)
//   LOYALTY_APP_KEY    an API key with scope app (never printed; nor is the token)
//   LOYALTY_CUSTOMER   the customer's external_id
// Optional expectations (what the till example left), checked when set:
//   LOYALTY_EXPECT_AVAILABLE=400  LOYALTY_EXPECT_NEXT_EXPIRY=1  LOYALTY_EXPECT_GIFTS=1
//
// Every answer is checked (the ledger adds up to the balance, pages do not overlap, the token
// reads nothing else, ...); exit status 0 when all were right, 1 otherwise.
'use strict';

const path = require('node:path');
const fs = require('node:fs');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.LOYALTY_PROTO_DIR || path.join(__dirname, '..', '..', 'proto');
const ENDPOINT = process.env.LOYALTY_ENDPOINT || '127.0.0.1:50051';
const DEADLINE_MS = 5000;
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED]);

class WrongAnswer extends Error {}

function expect(condition, what) {
  if (!condition) throw new WrongAnswer(what);
  console.log(`    ok: ${what}`);
}

function loadApi() {
  const dir = path.join(PROTO_ROOT, 'loyalty', 'v1');
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.proto')).map((f) => `loyalty/v1/${f}`);
  const definition = protoLoader.loadSync(files, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the protos: next_expiry, page_token
    longs: String, // int64 arrives as a decimal string; add them up with BigInt
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).loyalty.v1;
}

// A unary call with a bearer credential and a deadline. Reads are safe to repeat, so
// UNAVAILABLE and DEADLINE_EXCEEDED are retried a few times.
async function call(client, method, request, bearer) {
  let delay = 100;
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await new Promise((resolve, reject) => {
        const metadata = new grpc.Metadata();
        metadata.set('authorization', `Bearer ${bearer}`);
        client[method](request, metadata, { deadline: Date.now() + DEADLINE_MS },
          (error, reply) => (error ? reject(error) : resolve(reply)));
      });
    } catch (error) {
      if (!RETRYABLE.has(error.code) || attempt === 5) throw error;
      console.log(`    ${method}: ${grpc.status[error.code]}, retry ${attempt}`);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 2000);
    }
  }
}

async function expectCode(promise, code, what) {
  try {
    await promise;
  } catch (error) {
    expect(error.code === code, `${what} (got ${grpc.status[error.code]})`);
    return;
  }
  throw new WrongAnswer(`${what}, but the call succeeded`);
}

function date(ts) {
  return ts ? new Date(Number(ts.seconds) * 1000).toISOString().slice(0, 10) : '-';
}

async function main() {
  const appKey = process.env.LOYALTY_APP_KEY;
  const customer = process.env.LOYALTY_CUSTOMER;
  if (!appKey || !customer) {
    console.log('set LOYALTY_APP_KEY (scope app) and LOYALTY_CUSTOMER');
    return 2;
  }
  const api = loadApi();
  const credentials = grpc.credentials.createInsecure();
  const members = new api.MemberService(ENDPOINT, credentials);

  try {
    // The backend signs the customer in, then mints a token for their app (kept out of logs).
    const { token } = await call(members, 'IssueCustomerToken',
      { external_id: customer, ttl_seconds: 300 }, appKey);
    expect(token.startsWith('lct_'), 'the backend got a customer token for the app');

    console.log(`reader: ${customer}`);
    const reply = await call(members, 'GetBalance', { external_id: customer }, token);
    const b = reply.balance;
    const available = BigInt(b.available);
    const pending = BigInt(b.pending);
    console.log(`    balance: ${b.available} points available, ${b.pending} pending ` +
      `(${reply.purchase_count} purchases)`);
    if (reply.next_expiry) {
      console.log(`    next expiry: ${reply.next_expiry.points} points on ${date(reply.next_expiry.expires_at)}`);
      const points = BigInt(reply.next_expiry.points);
      expect(points > 0n && points <= available, 'the expiring points are part of the available ones');
      expect(Number(reply.next_expiry.expires_at.seconds) * 1000 > Date.now(), 'the expiry lies ahead');
    } else {
      console.log('    next expiry: none (no available points expire)');
    }
    if (process.env.LOYALTY_EXPECT_AVAILABLE) {
      expect(available === BigInt(process.env.LOYALTY_EXPECT_AVAILABLE),
        `${process.env.LOYALTY_EXPECT_AVAILABLE} points available, as the till left them`);
    }
    if (process.env.LOYALTY_EXPECT_NEXT_EXPIRY === '1') {
      expect(reply.next_expiry != null, 'a next expiry is shown (the program expires points)');
    }

    // The ledger, newest first, three entries a page, to show the paging.
    let sum = 0n;
    let pages = 0;
    let count = 0;
    let previous = null;
    const kinds = new Set();
    let pageToken = '';
    do {
      const page = await call(members, 'ListLedger',
        { external_id: customer, page_size: 3, page_token: pageToken }, token);
      pages += 1;
      if (page.entries.length > 3) throw new WrongAnswer('at most 3 entries a page');
      for (const entry of page.entries) {
        const id = BigInt(entry.entry_id);
        if (previous !== null && id >= previous) throw new WrongAnswer('ledger entries newest first, never repeated');
        previous = id;
        sum += BigInt(entry.points);
        count += 1;
        kinds.add(entry.kind.replace('LEDGER_ENTRY_KIND_', ''));
        console.log(`    ${date(entry.created_at)}  ${entry.kind.replace('LEDGER_ENTRY_KIND_', '').padEnd(15)} ` +
          `${entry.points.padStart(6)}  ${entry.reference}`);
      }
      pageToken = page.next_page_token;
    } while (pageToken);
    expect(pages >= Math.ceil(count / 3), `${count} ledger entries in ${pages} pages, newest first, none repeated`);
    expect(sum === available + pending, `the ledger adds up to the balance: ${sum} = ${available} + ${pending}`);
    if (process.env.LOYALTY_EXPECT_AVAILABLE) {
      for (const kind of ['EARN', 'RESERVE', 'RELEASE', 'RETURN_CLAWBACK', 'REDEEM_REFUND']) {
        expect(kinds.has(kind), `the ledger shows ${kind}`);
      }
    }

    await readGifts(members, customer, token);

    // The token reads its own customer only; an unknown customer is NOT_FOUND to the backend.
    const stranger = `no-such-card-${crypto.randomBytes(4).toString('hex')}`;
    await expectCode(call(members, 'GetBalance', { external_id: stranger }, token),
      grpc.status.PERMISSION_DENIED, 'the token cannot read another customer');
    await expectCode(call(members, 'GetBalance', { external_id: stranger }, appKey),
      grpc.status.NOT_FOUND, 'an unknown customer is NOT_FOUND');
  } catch (error) {
    if (error instanceof WrongAnswer) {
      console.log(`    WRONG: expected ${error.message}`);
    } else if (error.code !== undefined) {
      console.log(`    WRONG: unexpected ${grpc.status[error.code]}: ${error.details}`);
    } else {
      throw error;
    }
    return 1;
  } finally {
    members.close();
  }
  console.log('reader: done');
  return 0;
}

// MemberService.ListCustomerGifts came with gifts; older protos or servers do not have it.
async function readGifts(members, customer, token) {
  if (typeof members.ListCustomerGifts !== 'function') {
    console.log('    gifts: skipped (these protos have no MemberService.ListCustomerGifts)');
    return;
  }
  const grants = [];
  let pageToken = '';
  try {
    do {
      const page = await call(members, 'ListCustomerGifts',
        { external_id: customer, page_size: 50, page_token: pageToken }, token);
      grants.push(...page.grants);
      pageToken = page.next_page_token;
    } while (pageToken);
  } catch (error) {
    if (error.code === grpc.status.UNIMPLEMENTED) {
      console.log('    gifts: skipped (the server does not implement ListCustomerGifts yet)');
      return;
    }
    throw error;
  }
  // A gift code is a bearer secret: the app shows it to its customer, a log never does.
  for (const g of grants) {
    console.log(`    gift: ${g.gift_name} (${g.status.replace('GIFT_GRANT_STATUS_', '')}), ` +
      `valid ${date(g.valid_from)} to ${date(g.valid_until)}, code hidden`);
  }
  console.log(`    gifts: ${grants.length}`);
  expect(grants.every((g) => g.external_id === customer), 'every gift listed is this customer\'s');
  if (process.env.LOYALTY_EXPECT_GIFTS === '1') {
    expect(grants.some((g) => g.gift_id === 'welcome-coffee' && g.status === 'GIFT_GRANT_STATUS_REDEEMED'),
      'the welcome gift is there, redeemed at the till');
  }
}

main().then((code) => { process.exitCode = code; }, (error) => {
  console.log(`reader failed: ${error.message}`);
  process.exitCode = 1;
});
