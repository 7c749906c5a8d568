// Screenshots for the README, in headless Chromium (Debian's package), and a check that
// every plot the assets embed renders on its asset page.
//   npm install playwright-core   (outside the project; NODE_PATH to its node_modules)
//   prefpack run && (set -m; prefpack ui --port 3456 &)
//   node docs/screenshot.js http://127.0.0.1:3456 docs
// Writes docs/asset_graph.png and docs/plot_<key>.png; exits 1 if a plot did not render.
const { chromium } = require('playwright-core');

// (asset, metadata key of its PNG plot)
const PLOTS = [
  ['curated_pairs', 'funnel_plot'],
  ['tokenized_pairs', 'length_plot'],
  ['packed_shards', 'fill_plot'],
  ['trained_model', 'loss_plot'],
];

async function dismissModal(page) {
  const skip = page.getByRole('button', { name: 'Skip' }); // the first-visit newsletter modal
  if (await skip.count()) {
    await skip.click();
    await page.waitForTimeout(2000);
  }
}

async function plot(page, base, asset, key, out) {
  await page.goto(`${base}/assets/${asset}`, { waitUntil: 'networkidle' });
  await page.waitForTimeout(3000);
  await dismissModal(page);
  const row = page.locator('tr', { hasText: key }).first();
  await row.getByText('[Show Markdown]').click();
  const image = page.getByRole('dialog').locator('img').first();
  await image.waitFor({ timeout: 15000 });
  const width = await image.evaluate((img) => img.complete && img.naturalWidth);
  await page.getByRole('dialog').screenshot({ path: `${out}/plot_${key}.png` });
  await page.keyboard.press('Escape');
  return width;
}

(async () => {
  const [base, out] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    // No background networking: this machine's network is closed.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1800, height: 900 } });
  const url = `${base}/assets/trained_model?view=lineage&lineageScope=upstream&lineageDepth=10`;
  await page.setViewportSize({ width: 1800, height: 640 });
  await page.goto(url, { waitUntil: 'networkidle' });
  await page.waitForTimeout(4000);
  await dismissModal(page);
  await page.waitForTimeout(4000);
  await page.screenshot({ path: `${out}/asset_graph.png` });
  await page.setViewportSize({ width: 1800, height: 900 });
  let failed = 0;
  for (const [asset, key] of PLOTS) {
    const width = await plot(page, base, asset, key, out);
    console.log(`${asset} ${key}: ${width ? `rendered, ${width} px wide` : 'NOT RENDERED'}`);
    if (!width) failed += 1;
  }
  await browser.close();
  process.exit(failed ? 1 : 0);
})();
