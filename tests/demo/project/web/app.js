// Lists the items the API knows.
async function load() {
  const answer = await fetch("/items").then((r) => r.json());
  const list = document.getElementById("items");
  list.innerHTML = "";
  for (const [name, count] of Object.entries(answer.items)) {
    const li = document.createElement("li");
    li.textContent = `${name}: ${count}`;
    list.appendChild(li);
  }
}

load();
