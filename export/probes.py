"""Fixed probe texts for checking exported variants against the FP32 reference."""

from __future__ import annotations

import textwrap

_QUERIES: tuple[str, ...] = (
    "how do I reset a router",
    "best hiking boots for wide feet",
    "cheap flights from boston to lisbon in march",
    "what is the capital of australia",
    "symptoms of vitamin d deficiency",
    "how long to boil an egg for a runny yolk",
    "python list comprehension with if else",
    "why is my sourdough starter not rising",
    "nearest pharmacy open now",
    "how to change a flat tire on a bicycle",
    "difference between roth ira and traditional ira",
    "git undo last commit but keep changes",
    "weather tomorrow in seattle",
    "how many calories in a banana",
    "best budget noise cancelling headphones 2024",
    "what does a tenant need to break a lease",
    "how to remove red wine stain from carpet",
    "train schedule zurich to milan",
    "is coffee bad for high blood pressure",
    "how to write a cover letter with no experience",
    "kubernetes pod stuck in crashloopbackoff",
    "easy vegetarian dinner recipes for two",
    "who won the world cup in 2010",
    "how to calculate compound interest monthly",
    "dog keeps scratching ears at night",
    "what time does the louvre open on sunday",
    "convert 350 fahrenheit to celsius",
    "how to grow tomatoes on a balcony",
    "meaning of the word ephemeral",
    "rust borrow checker cannot borrow as mutable",
    "how to negotiate a higher salary offer",
    "side effects of ibuprofen long term",
    "best time of year to visit japan",
    "how to clean a cast iron skillet",
    "sql join vs left join example",
    "how to fix a leaking kitchen faucet",
    "what causes northern lights",
    "how to start running as a beginner",
    "mortgage rates comparison 30 year fixed",
    "how to install ubuntu alongside windows",
    "why do cats knead blankets",
    "how to file taxes as a freelancer",
    "what is the speed of light in km per second",
    "how to make cold brew coffee at home",
    "laptop battery drains fast when sleeping",
    "history of the roman empire summary",
    "how to say thank you in korean",
    "signs of burnout at work",
    "how to back up an iphone to a computer",
    "is it safe to eat raw cookie dough",
    "electric car charging cost per mile",
    "how to teach a child to ride a bike",
)

_TINY: tuple[str, ...] = (
    "GPU",
    "42",
    "?",
    "ok",
    "New York",
    "a",
    "I",
    "the",
    "hello",
    "Hello!",
    "yes",
    "no",
    "0",
    "3.14159",
    "-1",
    "1,000,000",
    "!!!",
    "...",
    "#",
    "@",
    "🙂",
    "🚀",
    "NASA",
    "HTTP",
    "CPU RAM",
    "USB-C",
    "e-mail",
    "covid",
    "Paris",
    "machine learning",
    "thanks",
    "dog",
    "cat",
    "2024",
    "$",
    "%",
    "C++",
    "data",
    "Tokyo",
    "ice cream",
)

_SENTENCES: tuple[str, ...] = (
    "Patients with type 2 diabetes are often advised to monitor their blood glucose before and after meals.",
    "The physician ordered a chest X-ray after the patient reported a persistent cough lasting three weeks.",
    "Regular hand washing remains one of the most effective ways to limit the spread of respiratory infections.",
    "Antibiotics do not work against viral infections such as the common cold or seasonal influenza.",
    "A mild concussion can cause headaches, dizziness, and difficulty concentrating for several days.",
    "The contract may be terminated by either party with thirty days of written notice.",
    "Under the statute, the landlord must return the security deposit within fourteen days of move-out.",
    "The appellate court reversed the lower court's ruling on procedural grounds.",
    "A will that is not signed in front of two witnesses may be declared invalid in some jurisdictions.",
    "The defendant's attorney filed a motion to suppress evidence obtained without a warrant.",
    "Brown the onions slowly over medium heat until they turn sweet and golden.",
    "Let the dough rest in the refrigerator overnight so the flavor can develop.",
    "Add a pinch of salt to the chocolate sauce to make the sweetness more pronounced.",
    "The risotto needs constant stirring and warm stock added one ladle at a time.",
    "Sear the steak in a very hot pan, then finish it in the oven to the desired doneness.",
    "The striker scored twice in the second half to secure a comeback victory for the visitors.",
    "After a rain delay of two hours, the final set was played under the stadium lights.",
    "The marathon runner kept an even pace for the first thirty kilometers before speeding up.",
    "The home team's goalkeeper made seven saves and was named player of the match.",
    "She broke the national record in the 400 meter hurdles at the age of nineteen.",
    "The central bank raised interest rates by a quarter point to cool persistent inflation.",
    "Diversifying across asset classes can reduce the volatility of a long-term portfolio.",
    "The company's quarterly revenue grew eight percent, but operating margins narrowed.",
    "Bond prices generally fall when market interest rates rise.",
    "An emergency fund covering three to six months of expenses protects against sudden job loss.",
    "The function returns None when the input list is empty instead of raising an exception.",
    "We migrated the service from a monolith to several smaller services behind an API gateway.",
    "The memory leak was traced to a cache that never evicted stale entries.",
    "Unit tests run on every pull request, and the build fails if coverage drops below eighty percent.",
    "The database index on the user_id column reduced query latency from seconds to milliseconds.",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War in central Europe.",
    "The printing press made books far cheaper and helped spread literacy across Europe.",
    "The ancient city of Carthage was destroyed by Roman forces in 146 BC.",
    "The Silk Road connected merchants from China to the Mediterranean for over a thousand years.",
    "The first transatlantic telegraph cable was completed in 1858 but failed within weeks.",
    "The ferry to the island departs every hour from the old harbor during the summer season.",
    "Travelers should carry a printed copy of their hotel reservation when crossing the border.",
    "The mountain hut offers simple bunk beds and a hot dinner to hikers who book in advance.",
    "Our connecting flight was canceled, so the airline rebooked us on an overnight train.",
    "The old town is best explored on foot, since most streets are too narrow for cars.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The telescope detected a faint signal from a galaxy more than ten billion light years away.",
    "Honeybees communicate the location of flowers through a pattern called the waggle dance.",
    "The new library branch will offer free workshops on resume writing every Thursday evening.",
    "Heavy snowfall closed the mountain pass and stranded dozens of trucks overnight.",
    "The orchestra opened the season with a bold performance of a rarely heard symphony.",
    "Recycling aluminum cans saves most of the energy needed to produce new aluminum from ore.",
)

_PASSAGE_PARTS: tuple[tuple[str, ...], ...] = (
    (
        "Home networking problems are frustrating because the symptoms are often vague.",
        "A laptop may show full signal strength while pages still refuse to load, or a phone may connect for a minute and then silently drop.",
        "The first step is to decide whether the issue lies with the device, the router, or the connection from the provider.",
        "Testing a second device on the same network quickly narrows the search.",
        "If every device fails, restarting the modem and router in the right order usually helps: power down both, wait thirty seconds, start the modem, and only then start the router.",
        "When the problem affects a single laptop, forgetting the saved network and joining it again clears stale settings.",
        "Interference from microwaves, thick walls, or neighboring networks on the same channel can also degrade performance.",
        "Many routers offer an automatic channel selection feature, but choosing a less crowded channel by hand is sometimes more reliable.",
        "Finally, firmware updates fix security holes and stability bugs, so it is worth checking for them every few months.",
    ),
    (
        "Sourdough bread relies on a living culture of wild yeast and lactic acid bacteria rather than commercial yeast.",
        "Bakers keep this culture, called a starter, in a jar and feed it regularly with flour and water.",
        "A healthy starter doubles in size within several hours of feeding and smells pleasantly sour, somewhere between yogurt and ripe fruit.",
        "When the starter is sluggish, the usual causes are a cold kitchen, irregular feeding, or flour with little natural yeast on it.",
        "Moving the jar to a warmer spot and switching to whole grain flour for a few days often revives it.",
        "The dough itself benefits from a long, slow fermentation.",
        "Instead of kneading vigorously, many bakers perform a series of gentle stretches and folds spaced half an hour apart.",
        "This builds strength in the gluten network while preserving the bubbles that give the crumb its open texture.",
        "After shaping, the loaf can rest overnight in the refrigerator, which deepens the flavor and makes scoring easier.",
        "Baking in a preheated covered pot traps steam during the first minutes, allowing the crust to expand before it sets.",
    ),
    (
        "The Roman Republic did not collapse in a single day; it eroded over roughly a century of political violence.",
        "Powerful generals commanded armies whose soldiers were more loyal to their commander than to the Senate.",
        "Reformers such as the Gracchus brothers tried to redistribute public land to struggling citizens, and both were killed by their opponents.",
        "Later, Marius and Sulla fought bitter civil wars, and Sulla marched on Rome itself, an act once considered unthinkable.",
        "By the time Julius Caesar crossed the Rubicon in 49 BC, the old rules of shared power had already lost much of their force.",
        "Caesar's victory and his appointment as dictator for life alarmed senators who feared the return of kingship.",
        "His assassination in 44 BC did not restore the Republic, however.",
        "Instead, it triggered another round of conflict that ended with his adopted heir, Octavian, as the sole master of the Roman world.",
        "Octavian, later called Augustus, was careful to preserve the outward forms of republican government while holding real authority himself.",
        "Historians still debate whether the transition was inevitable or the result of individual choices at critical moments.",
    ),
    (
        "Index funds have become one of the most popular ways for ordinary people to invest for retirement.",
        "Rather than trying to pick winning companies, an index fund simply buys every stock in a market benchmark in proportion to its size.",
        "Because there is no team of analysts making constant decisions, the annual fees are usually very low.",
        "Over long periods, those small savings compound into a meaningful difference in final wealth.",
        "Research has repeatedly shown that most actively managed funds fail to beat their benchmark after costs over ten or twenty years.",
        "Index investing is not free of risk, though.",
        "When the overall market falls, an index fund falls with it, and there is no manager who might move into cash.",
        "Investors therefore need the discipline to stay invested through downturns rather than selling in a panic.",
        "Pairing stock index funds with bond funds can soften the swings, and the right mix depends on a person's age, goals, and tolerance for losses.",
        "Rebalancing once a year keeps the portfolio close to its intended allocation without requiring constant attention.",
    ),
    (
        "Code review is one of the cheapest ways for a software team to catch defects before they reach production.",
        "A good review is not about proving that the reviewer is smarter than the author.",
        "It is a conversation about whether the change is correct, understandable, and consistent with the rest of the system.",
        "Small pull requests are far easier to review carefully than large ones, so teams often set informal limits on the number of lines changed.",
        "Reviewers should read the description first to understand the intent, then examine tests to see which behaviors are covered.",
        "Comments work best when they explain the reasoning behind a suggestion instead of simply demanding a change.",
        "Authors, for their part, should resist taking feedback personally and should ask clarifying questions when a comment is ambiguous.",
        "Automated tools can handle formatting and simple lint rules, which frees humans to focus on design and logic.",
        "Over time, a healthy review culture spreads knowledge across the team, so that no single person is the only one who understands a critical module.",
    ),
    (
        "Sleep is not a passive state in which the brain simply switches off.",
        "During the night, the brain cycles through several stages, including light sleep, deep slow-wave sleep, and rapid eye movement sleep.",
        "Each stage appears to serve different purposes.",
        "Deep sleep is associated with physical recovery and the consolidation of certain kinds of memory, while REM sleep is linked to emotional processing and vivid dreaming.",
        "Adults who regularly sleep fewer than seven hours a night show measurable declines in attention, reaction time, and mood.",
        "Chronic sleep loss has also been associated with higher risks of obesity, heart disease, and diabetes.",
        "Good sleep habits are surprisingly simple, yet many people ignore them.",
        "Going to bed and waking at the same time every day, even on weekends, stabilizes the body's internal clock.",
        "Keeping the bedroom cool, dark, and quiet helps, as does avoiding caffeine in the afternoon and bright screens late in the evening.",
        "People who snore loudly or wake up gasping should talk to a doctor, since untreated sleep apnea can strain the heart over many years.",
    ),
    (
        "Renting an apartment involves more legal obligations than many first-time tenants realize.",
        "The lease is a binding contract, and its terms usually describe the monthly rent, the due date, the length of the tenancy, and the rules for ending it early.",
        "Before signing, tenants should read every clause, including those about pets, subletting, repairs, and late fees.",
        "In many places the landlord must keep the unit safe and habitable, which typically means working heat, plumbing, and electricity.",
        "If the landlord fails to make necessary repairs, local law may allow the tenant to withhold rent or arrange the repair and deduct its cost, but only after following specific notice procedures.",
        "Security deposits are often capped by statute, and the landlord may only deduct amounts for unpaid rent or damage beyond normal wear and tear.",
        "Taking dated photographs of the apartment on move-in day is a simple habit that prevents many disputes later.",
        "When a conflict cannot be resolved directly, tenant unions, mediation services, and small claims courts offer paths that are less expensive than hiring a lawyer.",
    ),
    (
        "The final of the regional football cup was decided in the last minutes of extra time.",
        "For most of the evening, the visitors had controlled possession, passing patiently around a compact defensive block.",
        "The home side rarely crossed the halfway line in the first half, but its goalkeeper made a string of sharp saves to keep the score level.",
        "Early in the second half, a quick counterattack finally broke the deadlock when the young winger cut inside and curled a shot into the far corner.",
        "The lead lasted only twelve minutes.",
        "A corner kick was headed back across the goal, and the visiting captain poked it over the line from close range.",
        "Neither team could find a winner in regular time, and fatigue began to show as players stretched cramping muscles on the grass.",
        "In the one hundred and eighteenth minute, a substitute who had been on the field for barely ten minutes chased a long clearance, outpaced two defenders, and calmly lifted the ball over the advancing goalkeeper.",
        "The stadium erupted, and the celebrations continued long after the final whistle.",
    ),
    (
        "Traveling by train across Europe offers a slower but often more rewarding experience than flying.",
        "Major cities are linked by high-speed lines that reach the center of town, which saves the time usually lost getting to and from airports.",
        "Regional trains, meanwhile, wind through valleys and along coastlines that are invisible from the sky.",
        "A rail pass can be economical for travelers who plan to move frequently, but point-to-point tickets bought early are sometimes cheaper for shorter trips.",
        "Seat reservations are mandatory on some high-speed and night trains, so it is wise to check before boarding.",
        "Night trains have made a comeback in recent years, offering couchettes and private sleeping compartments on long routes.",
        "Waking up in a new country after a night of rocking gently through the darkness has a charm that few airplanes can match.",
        "Travelers should keep an eye on their luggage at busy stations, carry some snacks for delays, and download timetables in case mobile data is unavailable in rural areas.",
    ),
    (
        "Climate scientists measure the warming of the planet using several independent sources of data.",
        "Weather stations on land have recorded temperatures for more than a century, while ships and floating buoys track the surface of the oceans.",
        "Satellites add a global view of the atmosphere, sea ice, and glaciers.",
        "Although each method has its own uncertainties, they agree that the average global temperature has risen by more than one degree Celsius since the late nineteenth century.",
        "Much of the extra heat has been absorbed by the oceans, which expand as they warm and contribute to rising sea levels.",
        "Melting ice sheets in Greenland and Antarctica add further water.",
        "The consequences are already visible in longer heat waves, shifts in rainfall patterns, and stronger storms in some regions.",
        "Reducing emissions from power plants, vehicles, buildings, and agriculture is the central strategy for limiting future warming.",
        "At the same time, communities are investing in adaptation measures such as flood barriers, heat-resistant crops, and early warning systems for extreme weather.",
    ),
    (
        "Learning a second language as an adult is difficult, but it is far from impossible.",
        "Children may absorb pronunciation more naturally, yet adults have advantages of their own, including better study habits and a mature understanding of grammar.",
        "The most effective learners combine structured practice with plenty of real exposure.",
        "Spaced repetition software helps vocabulary move from short-term to long-term memory by scheduling reviews just before a word would be forgotten.",
        "Listening to podcasts or watching series with subtitles builds comprehension and introduces the rhythms of everyday speech.",
        "Speaking remains the hardest skill for many people, largely because of the fear of making mistakes in front of others.",
        "Conversation exchanges, where two people each teach the other their native language, reduce that pressure.",
        "Progress rarely feels linear; learners often experience long plateaus followed by sudden leaps in understanding.",
        "Setting small, concrete goals, such as ordering a meal or describing a weekend, keeps motivation alive during the slow periods.",
    ),
    (
        "A database index works much like the index at the back of a book.",
        "Without it, the database would have to scan every row in a table to find the records that match a query.",
        "With an index on the relevant column, it can jump almost directly to the matching rows.",
        "Most relational databases implement indexes as balanced trees, which keep lookups fast even as tables grow to millions of rows.",
        "Indexes are not free, however.",
        "Every insert, update, or delete must also modify the index, which slows down writes and consumes additional disk space.",
        "Choosing which columns to index therefore requires understanding the actual queries an application runs.",
        "Columns used in join conditions, filters, and sort orders are common candidates.",
        "Composite indexes that cover several columns can be especially powerful, but the order of columns matters, because the index can only be used efficiently from the leftmost column onward.",
        "Query planners expose their decisions through explain plans, which reveal whether an index is actually being used.",
    ),
    (
        "The small coastal village wakes up long before the tourists do.",
        "Fishing boats leave the harbor in the dark, their lights bobbing on the water like slow fireflies.",
        "By the time the sun rises over the cliffs, the bakery has already sold its first trays of bread to workers heading to the docks.",
        "Narrow streets climb steeply from the waterfront, lined with whitewashed houses whose blue shutters are still closed against the morning chill.",
        "Around nine o'clock, the cafes set out their tables, and the smell of coffee drifts down toward the square.",
        "Visitors arrive by the morning bus, carrying cameras and guidebooks, and wander toward the lighthouse at the end of the breakwater.",
        "In the afternoon, the returning boats unload crates of sardines and octopus, which are sold directly to restaurants along the quay.",
        "When evening falls, families stroll along the promenade, children chase pigeons, and the old men who have played cards in the same corner for decades finally fold their hands and walk home.",
    ),
    (
        "Vaccines train the immune system to recognize a pathogen without causing the disease itself.",
        "Traditional vaccines contain weakened or inactivated viruses, or fragments of proteins from their surface.",
        "Newer approaches deliver genetic instructions that cause the body's own cells to produce a harmless piece of the target protein for a short time.",
        "In every case, the immune system responds by producing antibodies and memory cells.",
        "If the person later encounters the real pathogen, these memory cells mount a faster and stronger defense.",
        "Vaccines undergo several phases of clinical trials before approval, beginning with small safety studies and expanding to thousands of volunteers.",
        "Even after approval, monitoring systems continue to collect reports of side effects so that rare problems can be detected.",
        "Most side effects are mild and short-lived, such as a sore arm, fatigue, or a low fever.",
        "When enough people in a community are immune, the spread of disease slows dramatically, protecting those who cannot be vaccinated for medical reasons.",
    ),
    (
        "Starting a small business requires more than a good idea.",
        "Before launching, founders should test whether customers are actually willing to pay for the product, ideally by selling a simple version before investing heavily.",
        "A basic business plan helps clarify costs, pricing, and the number of sales needed to break even.",
        "Cash flow is where many young companies fail: even profitable businesses can collapse if suppliers must be paid long before customers settle their invoices.",
        "Keeping personal and business finances in separate accounts simplifies bookkeeping and tax filing.",
        "Choosing the right legal structure affects liability, taxes, and the ability to raise money from investors.",
        "Many founders underestimate how much time administration consumes, from payroll to insurance to licenses.",
        "Outsourcing some of these tasks to an accountant or a payroll service often pays for itself.",
        "Finally, building relationships with early customers provides feedback that no market report can replace.",
    ),
    (
        "The migration of monarch butterflies is one of the most remarkable journeys in the animal kingdom.",
        "Every autumn, millions of monarchs from southern Canada and the northern United States fly thousands of kilometers to a few mountain forests in central Mexico.",
        "There they cluster by the thousands on fir trees, covering branches so densely that the bark disappears beneath orange wings.",
        "What makes the journey astonishing is that no single butterfly completes the round trip.",
        "The generation that flies south in autumn lives much longer than its summer ancestors, surviving the winter in a state of reduced activity.",
        "In spring, these butterflies head north and lay eggs on milkweed plants, and it takes several shorter-lived generations to reach the northern breeding grounds again.",
        "Scientists believe the insects navigate using the position of the sun combined with an internal clock, and perhaps the Earth's magnetic field.",
        "Habitat loss, pesticide use, and extreme weather have reduced their numbers, prompting efforts to plant milkweed along their migration routes.",
    ),
    (
        "Container orchestration platforms have changed how many organizations deploy software.",
        "Instead of installing applications directly on servers, teams package each service with its dependencies into a container image.",
        "The orchestrator then decides where to run those containers across a cluster of machines, restarts them if they crash, and scales them up or down as load changes.",
        "This flexibility comes with complexity.",
        "Engineers must describe deployments, services, networking rules, and storage in configuration files, and mistakes in those files can take down entire applications.",
        "Observability becomes essential, because a single user request may pass through a dozen services running on different machines.",
        "Centralized logging, metrics dashboards, and distributed tracing help engineers understand where time is spent and where failures occur.",
        "Smaller teams sometimes discover that a managed platform or even a few virtual machines would meet their needs with less operational burden.",
        "The right choice depends on the scale of the system and the experience of the people who will maintain it.",
    ),
    (
        "Making fresh pasta at home takes less equipment than most people expect.",
        "All that is truly needed is flour, eggs, a clean work surface, and a rolling pin.",
        "The classic method begins with a mound of flour with a well in the center, into which the eggs are cracked.",
        "Using a fork, the cook gradually pulls flour into the eggs until a shaggy dough forms, then switches to kneading by hand.",
        "After about ten minutes, the dough becomes smooth and elastic.",
        "It should rest, wrapped, for at least half an hour so the gluten can relax, which makes rolling far easier.",
        "The dough is then rolled as thin as possible, ideally thin enough to see the shadow of a hand through it.",
        "From there it can be cut into ribbons for tagliatelle, squares for ravioli, or wide sheets for lasagna.",
        "Fresh pasta cooks in only two or three minutes, so the sauce should be ready before it goes into the boiling, well-salted water.",
    ),
    (
        "The invention of the mechanical clock transformed daily life in medieval Europe.",
        "Before public clocks, most people measured time by the position of the sun and by church bells that rang for prayers at irregular intervals.",
        "Early mechanical clocks, installed in town towers during the fourteenth century, divided the day into equal hours regardless of the season.",
        "Merchants quickly adopted the new rhythm, scheduling markets and contracts by the hour.",
        "Workers in growing textile industries found their shifts measured by the clock rather than by daylight.",
        "These early machines were inaccurate by modern standards, sometimes drifting by a quarter of an hour each day.",
        "The pendulum clock, developed in the seventeenth century, improved accuracy dramatically and paved the way for scientific experiments that required precise timing.",
        "Later, the need to coordinate railway timetables led to standardized time zones, replacing the patchwork of local times that had differed from town to town.",
    ),
    (
        "Remote work has shifted from a rare perk to a common arrangement for many office jobs.",
        "Employees often value the absence of a daily commute and the ability to organize their day around family responsibilities.",
        "Employers, in turn, can recruit from a much wider geographic area and sometimes reduce spending on office space.",
        "The arrangement also brings real challenges.",
        "Communication that once happened naturally in hallways must now be planned, and new employees may struggle to learn unwritten norms without watching experienced colleagues.",
        "Some people feel isolated, while others find it difficult to separate work from home life when the laptop is always within reach.",
        "Successful remote teams tend to write things down, keeping decisions and context in shared documents rather than in private conversations.",
        "They schedule regular video calls for connection, not only for status updates, and they meet in person occasionally to build trust.",
        "Clear expectations about response times help avoid the pressure to be online at every hour.",
    ),
    (
        "Volcanoes form where molten rock from deep within the Earth finds a path to the surface.",
        "Most are located along the boundaries of tectonic plates, either where plates pull apart or where one plate dives beneath another.",
        "A smaller number, such as those in Hawaii, sit above hot spots far from any plate boundary.",
        "The style of an eruption depends largely on the composition of the magma.",
        "Runny, low-silica magma allows gas to escape easily, producing relatively gentle lava flows.",
        "Thick, silica-rich magma traps gas until pressure builds to a breaking point, which can lead to violent explosions that hurl ash high into the atmosphere.",
        "Volcanologists monitor active volcanoes with seismometers, gas sensors, and instruments that detect tiny changes in the shape of the ground.",
        "These signals cannot predict eruptions with perfect precision, but they often provide enough warning for authorities to evacuate nearby communities.",
        "Volcanic soils are also remarkably fertile, which is one reason people continue to live in their shadow.",
    ),
    (
        "Password managers solve a problem that most people handle badly: remembering dozens of strong, unique passwords.",
        "When the same password is reused across many websites, a breach at one service can expose accounts everywhere else.",
        "A password manager generates long random passwords, stores them in an encrypted vault, and fills them in automatically.",
        "The user only needs to remember a single strong master password.",
        "Critics point out that the vault becomes a single point of failure, but reputable managers encrypt data on the device so that the provider cannot read it.",
        "Enabling two-factor authentication on the manager and on important accounts adds another layer of protection.",
        "Hardware security keys offer the strongest form of second factor because they are resistant to phishing.",
        "For most people, the combination of a password manager and two-factor authentication dramatically reduces the risk of account takeover.",
        "It also saves time, since resetting forgotten passwords becomes a rare event rather than a weekly annoyance.",
    ),
    (
        "The history of coffee stretches from the highlands of Ethiopia to nearly every corner of the modern world.",
        "According to legend, a goat herder noticed that his animals became unusually energetic after eating the red berries of a certain shrub.",
        "Whether or not the story is true, by the fifteenth century coffee was being cultivated and brewed in Yemen, where Sufi monks drank it to stay awake during night prayers.",
        "Coffeehouses soon spread through the Ottoman Empire, becoming centers of conversation, music, and sometimes political dissent.",
        "European travelers brought the habit home, and by the late seventeenth century coffeehouses were thriving in London, Vienna, and Paris.",
        "Colonial powers established plantations in the Caribbean, South America, and Southeast Asia, often relying on forced labor.",
        "Today coffee is one of the most traded agricultural commodities, and millions of small farmers depend on its price, which can swing dramatically with weather and global demand.",
    ),
    (
        "Machine learning models are only as reliable as the data used to train them.",
        "If the training data contains systematic gaps, the model will inherit those gaps and may fail in exactly the situations where it is needed most.",
        "A medical image classifier trained mostly on images from one hospital, for example, may perform poorly on scans from a different scanner or patient population.",
        "Careful evaluation therefore requires test sets that reflect the real conditions of deployment, not just a random slice of the training data.",
        "Monitoring after deployment is equally important, because the world changes and the input distribution can drift over time.",
        "Teams often track summary statistics of incoming data and compare them with the training set, raising alerts when they diverge.",
        "Explaining model decisions is another challenge.",
        "Simple models may be easier to interpret, while complex neural networks usually require additional tools to highlight which features influenced a prediction.",
        "None of these techniques replace domain expertise, and the best results come from collaboration between engineers and the people who understand the problem.",
    ),
    (
        "Urban gardens have spread across many cities as residents look for green space and fresh food close to home.",
        "Vacant lots, rooftops, and even narrow strips beside railway lines have been transformed into plots of vegetables, herbs, and flowers.",
        "Beyond the harvest, these gardens create places where neighbors meet and share knowledge across generations.",
        "Older gardeners often teach younger ones how to save seeds, build compost, and recognize common pests.",
        "City soils can contain lead and other contaminants, so many projects grow food in raised beds filled with clean soil.",
        "Water access is another practical concern, and some gardens collect rainwater from nearby roofs in large barrels.",
        "Schools use gardens as outdoor classrooms for lessons in biology, nutrition, and even mathematics, as students measure growth and calculate yields.",
        "Although urban agriculture cannot feed an entire city, it improves access to fresh produce in neighborhoods where grocery stores are scarce.",
    ),
    (
        "A good hiking trip begins long before the first step on the trail.",
        "Hikers should study the route on a map, noting the distance, the total elevation gain, water sources, and possible exit points.",
        "Weather in the mountains can change quickly, so checking the forecast the evening before and again in the morning is essential.",
        "Packing layers allows hikers to adjust to cold summits and warm valleys without carrying heavy gear.",
        "Sturdy footwear that has been broken in reduces the risk of blisters, and a small first aid kit handles minor injuries.",
        "It is wise to tell someone at home the planned route and the expected time of return.",
        "On the trail, starting early leaves a margin for unexpected delays and helps avoid afternoon thunderstorms.",
        "Hikers should turn back without hesitation if conditions deteriorate, because the summit will still be there another day.",
        "Finally, leaving no trace means carrying out all trash, staying on marked paths, and respecting wildlife from a distance.",
    ),
    (
        "Public libraries have evolved far beyond their traditional role as quiet rooms full of books.",
        "Many now lend laptops, wireless hotspots, musical instruments, and even gardening tools.",
        "They offer free internet access to people who cannot afford it at home, which has become essential for applying to jobs and accessing government services.",
        "Librarians help patrons navigate online forms, evaluate the reliability of information, and find resources for small businesses.",
        "Children's programs introduce young readers to stories and help parents build reading routines.",
        "For older adults, libraries provide classes on using smartphones and staying safe from online scams.",
        "Some branches host makerspaces with 3D printers and sewing machines, encouraging hands-on learning.",
        "Despite these expanding roles, libraries often face budget pressures, and communities regularly debate how much public money they deserve.",
        "Supporters argue that few institutions deliver so many services to so many people at such low cost.",
    ),
    (
        "Electric vehicles have moved from niche products to mainstream options in many markets.",
        "Their main advantage lies in efficiency: electric motors convert a much larger share of stored energy into motion than combustion engines do.",
        "They also produce no tailpipe emissions, which improves air quality in dense cities.",
        "The overall climate benefit depends on how the electricity is generated, but studies generally find lower lifetime emissions even on grids that still burn fossil fuels.",
        "Range anxiety, the fear of running out of charge far from a charger, remains a concern for many buyers.",
        "In practice, most daily trips are short, and owners who can charge at home overnight rarely need public chargers except on long journeys.",
        "Fast-charging networks are expanding along highways, though availability varies widely between regions.",
        "Battery prices have fallen dramatically over the past decade, and further improvements in chemistry and recycling are expected to reduce costs and the demand for scarce minerals.",
    ),
    (
        "The art of writing clear technical documentation is often undervalued.",
        "Developers tend to focus on the code itself, assuming that well-named functions will explain everything.",
        "Yet newcomers to a project need more than function names; they need to know why the system exists, how its parts fit together, and where to start.",
        "A useful documentation set usually includes a short overview, a quick-start guide that produces a working result within minutes, and detailed reference material.",
        "Examples are especially valuable, because readers often learn faster by adapting working code than by reading abstract descriptions.",
        "Documentation should be kept close to the code and updated in the same pull request that changes behavior, so that it does not silently drift out of date.",
        "Writing for an audience that lacks context forces authors to clarify their own thinking, and it frequently reveals awkward designs that deserve improvement.",
        "Good documentation reduces support requests and makes it easier for new contributors to join a project.",
    ),
    (
        "Bicycle maintenance intimidates many riders, yet most routine tasks require only a few basic tools.",
        "Keeping the tires properly inflated is the simplest and most important habit, since soft tires wear quickly, feel sluggish, and are more prone to punctures.",
        "The recommended pressure range is usually printed on the side of the tire.",
        "The chain deserves regular attention as well.",
        "After riding in rain or dust, wiping it with a rag and applying a few drops of lubricant to each link keeps the drivetrain quiet and prevents rust.",
        "Too much oil attracts grit, so the excess should be wiped away.",
        "Brakes should be checked before every long ride by squeezing the levers firmly and confirming that the pads meet the rim or rotor evenly.",
        "Worn pads are cheap and easy to replace.",
        "Learning to fix a flat tire on the roadside is a skill every cyclist should practice at home first, with a spare tube, two tire levers, and a small pump.",
        "Once a year, a professional service can catch problems with bearings, cables, and wheels that are harder to diagnose alone.",
    ),
)

_CODE_BLOCKS: tuple[str, ...] = (
    """
    def fibonacci(n: int) -> list[int]:
        seq = [0, 1]
        while len(seq) < n:
            seq.append(seq[-1] + seq[-2])
        return seq[:n]
    """,
    """
    import json
    from pathlib import Path

    def load_config(path: str) -> dict:
        with Path(path).open(encoding="utf-8") as fh:
            return json.load(fh)
    """,
    """
    class Stack:
        def __init__(self):
            self._items = []

        def push(self, item):
            self._items.append(item)

        def pop(self):
            if not self._items:
                raise IndexError("pop from empty stack")
            return self._items.pop()
    """,
    """
    with open("data.csv") as f:
        rows = [line.strip().split(",") for line in f if line.strip()]
    totals = {name: sum(map(float, vals)) for name, *vals in rows}
    print(sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[:5])
    """,
    """
    async def fetch_all(session, urls):
        tasks = [session.get(u) for u in urls]
        responses = await asyncio.gather(*tasks, return_exceptions=True)
        return [r for r in responses if not isinstance(r, Exception)]
    """,
    """
    function debounce(fn, wait) {
      let timer = null;
      return (...args) => {
        clearTimeout(timer);
        timer = setTimeout(() => fn.apply(this, args), wait);
      };
    }
    """,
    """
    const users = await fetch("/api/users").then((r) => r.json());
    const active = users.filter((u) => u.active).map((u) => u.email);
    console.log(`Found ${active.length} active users`);
    """,
    """
    export default function Counter() {
      const [count, setCount] = useState(0);
      return <button onClick={() => setCount(count + 1)}>Clicked {count} times</button>;
    }
    """,
    """
    SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue
    FROM customers c
    LEFT JOIN orders o ON o.customer_id = c.id
    WHERE o.created_at >= DATE '2023-01-01'
    GROUP BY c.name
    HAVING COUNT(o.id) > 3
    ORDER BY revenue DESC
    LIMIT 10;
    """,
    """
    CREATE TABLE products (
        id SERIAL PRIMARY KEY,
        sku VARCHAR(32) UNIQUE NOT NULL,
        price NUMERIC(10, 2) CHECK (price >= 0),
        created_at TIMESTAMP DEFAULT now()
    );
    """,
    """
    UPDATE accounts SET balance = balance - 100 WHERE id = 7;
    UPDATE accounts SET balance = balance + 100 WHERE id = 9;
    COMMIT;
    """,
    """
    fn main() {
        let words = vec!["apple", "banana", "cherry"];
        let lengths: Vec<usize> = words.iter().map(|w| w.len()).collect();
        println!("{:?}", lengths);
    }
    """,
    """
    #[derive(Debug, Clone, PartialEq)]
    pub struct Point {
        pub x: f64,
        pub y: f64,
    }

    impl Point {
        pub fn distance(&self, other: &Point) -> f64 {
            ((self.x - other.x).powi(2) + (self.y - other.y).powi(2)).sqrt()
        }
    }
    """,
    """
    fn parse_port(s: &str) -> Result<u16, String> {
        s.parse::<u16>().map_err(|e| format!("invalid port {s}: {e}"))
    }
    """,
    """
    #include <stdio.h>

    int main(void) {
        for (int i = 1; i <= 15; i++) {
            if (i % 15 == 0) puts("FizzBuzz");
            else if (i % 3 == 0) puts("Fizz");
            else if (i % 5 == 0) puts("Buzz");
            else printf("%d\\n", i);
        }
        return 0;
    }
    """,
    """
    size_t str_len(const char *s) {
        const char *p = s;
        while (*p) p++;
        return (size_t)(p - s);
    }
    """,
    """
    typedef struct node {
        int value;
        struct node *next;
    } node_t;

    void push(node_t **head, int value) {
        node_t *n = malloc(sizeof *n);
        n->value = value;
        n->next = *head;
        *head = n;
    }
    """,
    """
    #!/usr/bin/env bash
    set -euo pipefail
    for f in *.log; do
      gzip -9 "$f"
    done
    echo "compressed $(ls *.gz | wc -l) files"
    """,
    """
    find . -name '*.py' -not -path './.venv/*' | xargs grep -n 'TODO' | sort | head -20
    """,
    """
    docker run --rm -it -v "$PWD":/app -w /app -p 8080:8080 python:3.12-slim python -m http.server 8080
    """,
    """
    {
      "name": "edge-service",
      "version": "1.4.2",
      "dependencies": {"express": "^4.18.2", "zod": "^3.22.0"},
      "scripts": {"start": "node server.js", "test": "vitest run"}
    }
    """,
    """
    {"id": 1842, "user": {"name": "Ana", "roles": ["admin", "editor"]}, "active": true, "score": 97.5, "tags": []}
    """,
    """
    version: "3.9"
    services:
      web:
        image: nginx:1.25
        ports:
          - "80:80"
      db:
        image: postgres:16
        environment:
          POSTGRES_PASSWORD: example
    """,
    """
    name: ci
    on: [push, pull_request]
    jobs:
      test:
        runs-on: ubuntu-latest
        steps:
          - uses: actions/checkout@v4
          - run: pip install -e .[dev]
          - run: pytest -q
    """,
    """
    package main

    import "fmt"

    func main() {
        ch := make(chan int)
        go func() { ch <- 42 }()
        fmt.Println(<-ch)
    }
    """,
    """
    public class Greeter {
        public static void main(String[] args) {
            String name = args.length > 0 ? args[0] : "world";
            System.out.println("Hello, " + name + "!");
        }
    }
    """,
    """
    <!DOCTYPE html>
    <html lang="en">
      <head><title>Status</title></head>
      <body><p class="ok">All systems operational.</p></body>
    </html>
    """,
    """
    .card {
      display: flex;
      gap: 1rem;
      padding: 12px 16px;
      border-radius: 8px;
      box-shadow: 0 1px 3px rgba(0, 0, 0, 0.2);
    }
    """,
    """
    import numpy as np

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))
    """,
    """
    library(dplyr)
    df %>%
      filter(year >= 2000) %>%
      group_by(country) %>%
      summarise(mean_gdp = mean(gdp, na.rm = TRUE))
    """,
    """
    [package]
    name = "tiny-cli"
    version = "0.3.1"
    edition = "2021"

    [dependencies]
    clap = { version = "4", features = ["derive"] }
    """,
    """
    diff --git a/app.py b/app.py
    @@ -10,7 +10,7 @@ def handler(event):
    -    timeout = 30
    +    timeout = 60
         return process(event, timeout=timeout)
    """,
)

_MULTILINGUAL: tuple[str, ...] = (
    "Wie spät ist es in Berlin?",
    "beste Wanderwege im Schwarzwald",
    "Der Zug nach München hat heute zwanzig Minuten Verspätung.",
    "Ich habe meinen Regenschirm im Büro vergessen.",
    "Die Ärztin empfahl mir, mehr Wasser zu trinken und früher schlafen zu gehen.",
    "comment faire une pâte brisée maison",
    "Où se trouve la gare la plus proche ?",
    "Le musée est fermé le mardi, mais ouvert tard le jeudi soir.",
    "Nous avons passé le week-end à la campagne chez mes grands-parents.",
    "La réunion a été reportée à la semaine prochaine à cause de la grève.",
    "cómo aprender a tocar la guitarra",
    "¿Cuánto cuesta un billete de autobús a Madrid?",
    "El mercado abre todos los sábados por la mañana en la plaza mayor.",
    "Mi hermana estudia medicina en la Universidad de Salamanca.",
    "Las lluvias intensas provocaron inundaciones en varias zonas del sur.",
    "ricetta tiramisù senza uova",
    "Il treno per Firenze parte dal binario sette.",
    "Abbiamo mangiato una pizza buonissima vicino al porto.",
    "La biblioteca comunale offre corsi gratuiti di fotografia.",
    "como tirar o visto de trabalho em Portugal",
    "O restaurante fica aberto até meia-noite às sextas-feiras.",
    "Choveu muito ontem e as ruas do centro ficaram alagadas.",
    "Ela trabalha como engenheira de software em São Paulo.",
    "как выучить английский язык быстро",
    "Сегодня в Москве ожидается снег и сильный ветер.",
    "Мы купили билеты на поезд до Санкт-Петербурга.",
    "Врач посоветовал мне больше гулять на свежем воздухе.",
    "北京今天天气怎么样",
    "我每天早上坐地铁去上班。",
    "这家餐厅的饺子非常好吃，价格也不贵。",
    "如何提高英语口语水平",
    "人工智能正在改变许多行业的工作方式。",
    "東京駅までの行き方を教えてください",
    "週末は友達と一緒に京都へ旅行しました。",
    "このレストランは予約しないと入れません。",
    "新しいスマートフォンのバッテリーは一日中持ちます。",
    "서울에서 부산까지 기차로 얼마나 걸려요?",
    "오늘 저녁에 친구들과 영화를 보러 갈 거예요.",
    "한국어를 배우는 것은 어렵지만 재미있어요.",
    "ما هي أفضل طريقة لتعلم البرمجة؟",
    "يفتح المتحف أبوابه من الساعة التاسعة صباحا حتى الخامسة مساء.",
    "ذهبنا إلى السوق لشراء الخضار والفواكه الطازجة.",
    "दिल्ली में सबसे अच्छा खाना कहाँ मिलता है?",
    "मुझे हर सुबह चाय पीना बहुत पसंद है।",
    "बारिश के कारण आज स्कूल बंद रहेगा।",
    "İstanbul'da görülecek en güzel yerler",
    "Yarın sabah erkenden havaalanına gitmemiz gerekiyor.",
    "Bu kitabı geçen yaz tatilde okudum.",
    "jak ugotować pierogi ruskie",
    "Pociąg do Krakowa odjeżdża o godzinie ósmej.",
    "W przyszłym tygodniu zaczynam nową pracę w Warszawie.",
    "cách nấu phở bò ngon tại nhà",
    "Hôm nay trời mưa nên tôi ở nhà đọc sách.",
    "Chúng tôi đã đi du lịch Đà Nẵng vào mùa hè năm ngoái.",
    "Hoe laat vertrekt de trein naar Amsterdam?",
    "Πού είναι η πλησιέστερη παραλία;",
    "מה השעה עכשיו בתל אביב?",
)

_LONG_WHITESPACE = "  leading spaces\n\n\n\tand tabs\t\tbetween   words \n\n   trailing   \n\n"
_TABLE = (
    "| region | q1 | q2 | q3 | q4 |\n"
    "|--------|----|----|----|----|\n"
    "| north  | 12.5 | 13.1 | 14.0 | 15.8 |\n"
    "| south  | 9.2  | 9.9  | 10.4 | 11.0 |\n"
    "| east   | 20.1 | 19.7 | 21.3 | 22.9 |"
)


def _edge_cases() -> tuple[str, ...]:
    """Build the edge-case probes (whitespace, repetition, mixed script, URLs, tables)."""
    return (
        _LONG_WHITESPACE,
        "\n\nline one\n\n\n\nline two\n\n\n\n\nline three\n",
        "word " * 60 + "end",
        "a" * 300,
        "ha" * 120,
        "!" * 80,
        "0123456789" * 20,
        "Supercalifragilisticexpialidocious" * 6,
        "Meeting at 東京 office with Müller, Иванов, and 김민수 at 9:30 — bring the Q3 report 📊.",
        "The word for water is agua in Spanish, Wasser in German, вода in Russian, 水 in Chinese, and ماء in Arabic.",
        "Visit https://example.com/docs/v2/install?lang=en&os=linux#gpu for setup instructions.",
        "Contact support@example.org or j.doe+alerts@mail.example.co.uk before 2024-05-01T14:30:00Z.",
        "ftp://files.example.net/pub/releases/v1.2.3/archive.tar.gz sha256=9f86d081884c7d659a2feaa0c55ad015",
        _TABLE,
        "id,name,price,qty\n1,widget,2.50,100\n2,gadget,13.99,7\n3,doohickey,0.99,2500",
        "3.14159 2.71828 1.41421 1.73205 0.57721 1.61803 6.02214e23 6.62607e-34",
        "+1 (555) 013-2468, +44 20 7946 0958, +81 3-1234-5678",
        "ALL CAPS SENTENCE WITH NO PUNCTUATION AT ALL JUST SHOUTING INTO THE VOID",
        "<div class=\"note\"><b>Warning:</b> &lt;unsafe&gt; input &amp; output</div>",
        "# Heading\n\n- item one\n- item two\n\n> quoted text with **bold** and `code`",
        "🙂🙃😂🤖🚀🌍🔥💡✅❌",
        "cafe\u0301 vs café, naïve, coöperate, Ångström",
        "zero\u200bwidth\u200bspaces\u200bhidden\u200bhere",
        "RTL mix: שלום world مرحبا 123",
        "C:\\Users\\admin\\Documents\\report_final_v3 (1).docx",
        "¯\\_(ツ)_/¯",
        "x" + " y" * 150,
    )


def _code_snippets() -> tuple[str, ...]:
    """Dedent the raw code blocks into multi-line snippets."""
    return tuple(textwrap.dedent(block).strip("\n") for block in _CODE_BLOCKS)


def _passages() -> tuple[str, ...]:
    """Join each group of sentences into one coherent passage."""
    return tuple(" ".join(parts) for parts in _PASSAGE_PARTS)


PROBE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "query": _QUERIES,
    "tiny": _TINY,
    "sentence": _SENTENCES,
    "passage": _passages(),
    "code": _code_snippets(),
    "multilingual": _MULTILINGUAL,
    "edge": _edge_cases(),
}


def probe_texts() -> list[str]:
    """All probes in a stable order (categories in the order above), deduplicated."""
    seen: set[str] = set()
    out: list[str] = []
    for texts in PROBE_CATEGORIES.values():
        for text in texts:
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


RERANK_QUERIES = 24
RERANK_DOCUMENTS_PER_QUERY = 8


def rerank_probe_pairs() -> tuple[list[str], list[str], list[int]]:
    """(queries, documents, group) per probe pair: each of 24 queries (search queries and a
    few non-English ones) with 8 documents of every kind (sentences, passages, code, other
    languages, tiny texts), so a group's order is decided among mixed lengths and topics."""
    queries = list(_QUERIES[: RERANK_QUERIES - 4]) + [_MULTILINGUAL[i] for i in (0, 10, 27, 32)]
    pool = [*_SENTENCES, *_passages(), *_code_snippets(), *_MULTILINGUAL[::3], *_TINY[::5]]
    out_q, out_d, group = [], [], []
    for g, query in enumerate(queries):
        for j in range(RERANK_DOCUMENTS_PER_QUERY):
            out_q.append(query)
            out_d.append(pool[(g * 11 + j * 17) % len(pool)])
            group.append(g)
    return out_q, out_d, group
